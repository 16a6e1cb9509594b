//! `silk attest ...`: show this node's claims and attestation mode, verify a
//! quote, fetch collateral.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Subcommand;

use crate::attest::collateral::read_collateral_json;
use crate::attest::identity::identity_path;
use crate::attest::verify::rfc3339;
use crate::attest::{
    appraise_quote, now_unix, AttestError, AttestationDocument, AttestationMode, Claims,
    CollateralCache, CollateralKey, CollateralSource, Hex, NodeIdentity, PccsClient, Policy,
    ReportDataCheck, TsmReport, Verdict, NODE_VERSION,
};

/// `silk attest` subcommands.
#[derive(Debug, Subcommand)]
pub enum AttestCommand {
    /// Show this node's attestation claims and mode (tdx or insecure).
    Show {
        /// A model id this node serves (repeatable).
        #[arg(long = "model")]
        models: Vec<String>,
        /// Create the identity key if it does not exist yet.
        #[arg(long)]
        create_identity: bool,
        /// On a TDX guest, also make a quote over the claims and write it
        /// (raw bytes) to this file.
        #[arg(long)]
        quote_out: Option<PathBuf>,
        /// Also write the claims as JSON to this file (for
        /// `silk attest verify --claims`).
        #[arg(long)]
        claims_out: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Verify a TDX quote: signature chain, collateral, TCB status, policy
    /// and (with --claims) the report_data binding.
    Verify {
        /// The quote: raw bytes, or hex text.
        quote_file: PathBuf,
        /// DCAP collateral as JSON (dcap-qvl's QuoteCollateralV3 format).
        /// Default: the cache in DATA_DIR/attest/collateral, filled from
        /// --pccs when stale.
        #[arg(long)]
        collateral: Option<PathBuf>,
        /// Attestation policy (TOML). Default: UpToDate only, no debug, no
        /// accepted images.
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Claims (JSON) whose SHA-512 the quote's report_data must equal.
        #[arg(long)]
        claims: Option<PathBuf>,
        /// Verification time, RFC 3339 (default: now).
        #[arg(long)]
        at: Option<String>,
        /// PCCS base URL to fetch collateral from when it is not cached.
        #[arg(long, env = "SILK_PCCS_URL")]
        pccs: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Fetch the collateral for a quote from a PCCS into the cache (and
    /// optionally a file), for offline verification later.
    Collateral {
        /// The quote: raw bytes, or hex text.
        quote_file: PathBuf,
        /// PCCS base URL.
        #[arg(long, env = "SILK_PCCS_URL")]
        pccs: String,
        /// Also write the collateral JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Runs an attest subcommand.
pub fn run(cmd: AttestCommand, data_dir: &Path) -> anyhow::Result<ExitCode> {
    match cmd {
        AttestCommand::Show {
            models,
            create_identity,
            quote_out,
            claims_out,
            json,
        } => show(
            data_dir,
            models,
            create_identity,
            quote_out.as_deref(),
            claims_out.as_deref(),
            json,
        ),
        AttestCommand::Verify {
            quote_file,
            collateral,
            policy,
            claims,
            at,
            pccs,
            json,
        } => verify(
            data_dir,
            &quote_file,
            collateral.as_deref(),
            policy.as_deref(),
            claims.as_deref(),
            at.as_deref(),
            pccs.as_deref(),
            json,
        ),
        AttestCommand::Collateral {
            quote_file,
            pccs,
            out,
        } => fetch_collateral(data_dir, &quote_file, &pccs, out.as_deref()),
    }
}

fn collateral_cache(data_dir: &Path) -> CollateralCache {
    CollateralCache::new(data_dir.join("attest").join("collateral"))
}

fn show(
    data_dir: &Path,
    models: Vec<String>,
    create_identity: bool,
    quote_out: Option<&Path>,
    claims_out: Option<&Path>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let key_path = identity_path(data_dir);
    let tsm = TsmReport::default();
    let identity = match NodeIdentity::load(&key_path) {
        // In TDX mode a running node makes its key at each start and keeps
        // it in memory (audit F9): the check uses a key made the same way,
        // and writes nothing a later `silk run` would refuse.
        _ if tsm.is_available() => {
            let id = NodeIdentity::for_start(&key_path, true)?;
            eprintln!("TDX: using a key made now, in memory, as `silk run` does at each start");
            id
        }
        Ok(id) => id,
        Err(AttestError::IdentityMissing { path }) if !create_identity => {
            eprintln!(
                "No node identity yet: {} does not exist.\n\
                 It is created when the node first starts; to create it now, run\n  \
                 silk attest show --create-identity{}",
                path.display(),
                if data_dir == Path::new("") {
                    String::new()
                } else {
                    format!(" --data-dir {}", data_dir.display())
                }
            );
            return Ok(ExitCode::FAILURE);
        }
        Err(AttestError::IdentityMissing { .. }) => {
            let id = NodeIdentity::generate(&key_path)?;
            eprintln!("created node identity {}", key_path.display());
            id
        }
        Err(e) => return Err(e.into()),
    };
    let claims = Claims::new(Hex(identity.public_key()), models, NODE_VERSION, now_unix())?;
    let mode = if tsm.is_available() {
        AttestationMode::Tdx
    } else {
        AttestationMode::Insecure
    };
    if let Some(path) = claims_out {
        std::fs::write(path, serde_json::to_vec_pretty(&claims)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let mut digest = None;
    if let Some(path) = quote_out {
        let doc = AttestationDocument::produce(claims.clone(), &tsm)?;
        let Some(quote) = &doc.quote else {
            bail!(
                "cannot write a quote: no TDX quote interface at {} (insecure mode)",
                tsm.root().display()
            );
        };
        std::fs::write(path, quote).with_context(|| format!("writing {}", path.display()))?;
        digest = Some(doc.digest());
    }
    if json {
        let value = serde_json::json!({
            "mode": mode,
            "identity_file": key_path,
            "claims": claims,
            "report_data": Hex(claims.report_data()),
            "document_digest": digest,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = String::new();
    writeln!(out, "attestation mode: {mode}")?;
    if mode == AttestationMode::Insecure {
        writeln!(
            out,
            "  (no TDX quote interface at {}: this is not a TDX guest; the operator can read prompts)",
            tsm.root().display()
        )?;
    }
    writeln!(out, "identity file:    {}", key_path.display())?;
    writeln!(out, "public key:       {}", claims.peer_public_key)?;
    writeln!(
        out,
        "models:           {}",
        if claims.models.is_empty() {
            "(none)".to_string()
        } else {
            claims.models.join(", ")
        }
    )?;
    writeln!(out, "node version:     {}", claims.node_version)?;
    writeln!(
        out,
        "timestamp:        {} ({})",
        claims.timestamp,
        rfc3339(claims.timestamp)
    )?;
    writeln!(out, "report_data:      {}", Hex(claims.report_data()))?;
    if let (Some(path), Some(d)) = (quote_out, digest) {
        writeln!(out, "quote written:    {}", path.display())?;
        writeln!(out, "document digest:  {d}")?;
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// Reads a quote file: raw bytes, or the same as hex text.
fn read_quote(path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if let Ok(text) = std::str::from_utf8(&bytes) {
        let text = text.trim();
        if !text.is_empty() && text.len() % 2 == 0 {
            if let Ok(decoded) = hex::decode(text) {
                return Ok(decoded);
            }
        }
    }
    Ok(bytes)
}

fn parse_at(at: Option<&str>) -> anyhow::Result<u64> {
    let Some(at) = at else {
        return Ok(now_unix());
    };
    let t = chrono::DateTime::parse_from_rfc3339(at).with_context(|| {
        format!("--at {at:?} is not an RFC 3339 time (e.g. 2025-06-20T00:00:00Z)")
    })?;
    u64::try_from(t.timestamp()).context("--at is before 1970")
}

#[allow(clippy::too_many_arguments)]
fn verify(
    data_dir: &Path,
    quote_file: &Path,
    collateral: Option<&Path>,
    policy: Option<&Path>,
    claims: Option<&Path>,
    at: Option<&str>,
    pccs: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let quote = read_quote(quote_file)?;
    let at = parse_at(at)?;
    let policy = match policy {
        Some(p) => Policy::load(p)?,
        None => Policy::default(),
    };
    let claims: Option<Claims> = match claims {
        Some(p) => {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            Some(
                serde_json::from_slice(&bytes)
                    .with_context(|| format!("{} is not claims JSON", p.display()))?,
            )
        }
        None => None,
    };
    let collateral = match collateral {
        Some(p) => {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            read_collateral_json(&bytes, p)?
        }
        None => {
            let cache = collateral_cache(data_dir);
            let source = match pccs {
                Some(url) => CollateralSource::with_pccs(cache, PccsClient::new(url)),
                None => CollateralSource::offline(cache),
            };
            source.get(&quote, at)?
        }
    };
    let appraisal = appraise_quote(&quote, &collateral, &policy, claims.as_ref(), at);
    let code = if appraisal.verdict.is_accepted() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&appraisal)?);
        return Ok(code);
    }
    let mut out = String::new();
    writeln!(
        out,
        "quote:             {} ({} bytes)",
        quote_file.display(),
        quote.len()
    )?;
    writeln!(out, "verification time: {}", rfc3339(at))?;
    match &appraisal.quote {
        None => writeln!(out, "signature chain:   not verified")?,
        Some(q) => {
            let m = &q.measurements;
            writeln!(
                out,
                "signature chain:   ok (Intel root CA -> PCK -> quoting enclave -> quote)"
            )?;
            writeln!(out, "TCB status:        {}", q.tcb_status)?;
            writeln!(
                out,
                "advisories:        {}",
                if q.advisory_ids.is_empty() {
                    "none".to_string()
                } else {
                    q.advisory_ids.join(", ")
                }
            )?;
            writeln!(
                out,
                "collateral valid:  until {}",
                rfc3339(q.collateral_next_update)
            )?;
            writeln!(
                out,
                "debug TD:          {}",
                if m.debug { "YES" } else { "no" }
            )?;
            writeln!(out, "MRTD:              {}", m.mrtd)?;
            for (i, r) in m.rtmr.iter().enumerate() {
                writeln!(out, "RTMR{i}:             {r}")?;
            }
            writeln!(out, "MRCONFIGID:        {}", m.mr_config_id)?;
            writeln!(out, "MROWNER:           {}", m.mr_owner)?;
            writeln!(out, "MROWNERCONFIG:     {}", m.mr_owner_config)?;
            writeln!(out, "MRSEAM:            {}", m.mr_seam)?;
            writeln!(out, "TDATTRIBUTES:      {}", m.td_attributes)?;
            writeln!(out, "XFAM:              {}", m.xfam)?;
            writeln!(out, "image hash:        {}", m.image_hash())?;
            writeln!(out, "report_data:       {}", m.report_data)?;
        }
    }
    match &appraisal.report_data {
        ReportDataCheck::NotChecked => writeln!(
            out,
            "report_data check: not checked (pass --claims to bind the quote to claims)"
        )?,
        ReportDataCheck::Match => writeln!(out, "report_data check: ok (SHA-512 of the claims)")?,
        ReportDataCheck::Mismatch { expected, .. } => writeln!(
            out,
            "report_data check: MISMATCH, SHA-512 of the claims is {expected}"
        )?,
    }
    match &appraisal.verdict {
        Verdict::Rejected { reason } => writeln!(out, "verdict:           REJECTED: {reason}")?,
        v => writeln!(out, "verdict:           {v}")?,
    }
    print!("{out}");
    Ok(code)
}

fn fetch_collateral(
    data_dir: &Path,
    quote_file: &Path,
    pccs: &str,
    out: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let quote = read_quote(quote_file)?;
    let key = CollateralKey::from_quote(&quote)?;
    let client = PccsClient::new(pccs);
    let collateral = client.fetch(&key)?;
    let cache = collateral_cache(data_dir);
    cache.store(&key, &collateral)?;
    println!(
        "fetched collateral for FMSPC {} ({} CA) into {}",
        key.fmspc,
        key.ca,
        cache.dir().display()
    );
    if let Some(path) = out {
        std::fs::write(path, serde_json::to_vec_pretty(&collateral)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
