//! Writes the seed corpora into `fuzz/corpus/<target>/seed-*` from the
//! crates' own encoders (a signed announcement, job frames, cheques, a real
//! TDX quote, ...), and checks that each seed decodes. Run from anywhere:
//!
//! ```text
//! cargo run -p silk-fuzz --example write_seeds [-- path/to/model.gguf]
//! ```
//!
//! The GGUF seeds are cut from a real model file when one is given (or found
//! at `$SILK_GGUF`): its metadata with arrays shortened, and one row of
//! one tensor of each storage type, so every seed stays small.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Serialize;
use silk_chain::message::{to_boc, wallet_transfer, OutMessage};
use silk_chain::{Address, Cheque, Coins};
use silk_inference::gguf::{GgufFile, TensorType, Value};
use silk_node::attest::{AttestationDocument, AttestationMode, Claims, Hex};
use silk_node::protocol::{
    encode, ChequeAck, ChequeDelivery, Finish, JobMessage, JobRequest, JobUsage, PaymentTerms,
    TokenChunk, WirePrompt,
};
use silk_node::reputation::Reputation;
use silk_overlay::testing::seeded_keypair;
use silk_overlay::{Announcement, AttestationMode as GossipMode, JobErrorCode, SignedEnvelope};

/// Any error, boxed: an example, not library code.
type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The overlay's wire frame, mirrored (same variants in the same order) to
/// write whole job streams; every stream written is checked with the
/// overlay's own decoder.
#[derive(Serialize)]
enum WireFrame {
    Request { version: u16, request: Vec<u8> },
    Data(Vec<u8>),
    End(Vec<u8>),
    Error { code: JobErrorCode, message: String },
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus")
}

fn write(target: &str, name: &str, bytes: &[u8]) -> Result<()> {
    assert!(
        bytes.len() < 64 * 1024,
        "seed {target}/{name} is not under 64 KiB"
    );
    let dir = corpus().join(target);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
    Ok(())
}

fn job_request(payment: Option<PaymentTerms>, chat: bool) -> JobRequest {
    JobRequest {
        model: "smollm2-135m@sha256:0123456789abcdef".into(),
        prompt: if chat {
            WirePrompt::Chat(vec![
                ("system".into(), "Be brief.".into()),
                ("user".into(), "The capital of France is".into()),
            ])
        } else {
            WirePrompt::Text("The capital of France is".into())
        },
        max_tokens: 16,
        sampling: silk_inference::SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            seed: Some(42),
            frequency_penalty: 0.5,
            logit_bias: vec![(2, -100.0)],
            ..Default::default()
        },
        stop: vec!["\n".into()],
        ignore_eos: false,
        payment,
        continuation: if chat { Vec::new() } else { vec![330, 6342] },
        logprobs: if chat { Some(5) } else { None },
        constraint: chat.then(|| {
            silk_inference::Constraint::JsonSchema(
                r#"{"type":"object","properties":{"city":{"type":"string"}}}"#.into(),
            )
        }),
        prompt_logprobs: (!chat).then_some(2),
    }
}

/// A conversation that called a tool and got its result, asking for a
/// call under a grammar.
fn tools_request() -> JobRequest {
    let tool = silk_inference::Tool {
        name: "get_weather".into(),
        description: Some("Weather in a city.".into()),
        parameters:
            r#"{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}"#
                .into(),
    };
    let mut call = silk_inference::ChatMessage::new("assistant", "");
    call.tool_calls = vec![silk_inference::ToolCall {
        id: "call_1".into(),
        name: "get_weather".into(),
        arguments: r#"{"city":"Paris"}"#.into(),
    }];
    let mut result = silk_inference::ChatMessage::new("tool", r#"{"temp":9}"#);
    result.tool_call_id = Some("call_1".into());
    JobRequest {
        prompt: WirePrompt::Conversation {
            messages: vec![
                silk_inference::ChatMessage::new("user", "Weather in Paris and Rome?"),
                call,
                result,
            ],
            tools: vec![tool.clone()],
        },
        constraint: Some(silk_inference::Constraint::ToolCalls {
            tools: vec![tool],
            parallel: true,
        }),
        ..job_request(None, true)
    }
}

fn delivery() -> Result<ChequeDelivery> {
    let keys = silk_chain::Keys::from_seed([3; 32]);
    let cheque = Cheque {
        contract: Address::new(0, [1; 32]),
        worker: Address::new(0, [2; 32]),
        lane_id: 7,
        cumulative: Coins(1_250_000),
    }
    .sign(&keys)?;
    Ok(ChequeDelivery {
        job: 99,
        public_key: keys.public_key(),
        cheque,
    })
}

fn stream(frames: &[WireFrame]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for f in frames {
        let bytes = postcard::to_stdvec(f)?;
        out.extend_from_slice(&u32::try_from(bytes.len())?.to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    let decoded = silk_overlay::job::decode_stream(&out, silk_fuzz::MAX_FRAME_SIZE)?;
    assert_eq!(
        decoded,
        frames.len(),
        "the overlay must read back every frame"
    );
    Ok(out)
}

fn job_seeds() -> Result<()> {
    let payment = PaymentTerms {
        contract: Address::new(0, [1; 32]),
        public_key: silk_chain::Keys::from_seed([3; 32]).public_key(),
        lane_id: 7,
        job: 99,
    };
    let messages = [
        (
            "generate-text",
            JobMessage::Generate(job_request(None, false)),
        ),
        (
            "generate-chat-paid",
            JobMessage::Generate(job_request(Some(payment), true)),
        ),
        ("generate-tools", JobMessage::Generate(tools_request())),
        ("cheque", JobMessage::Cheque(delivery()?)),
    ];
    for (name, m) in &messages {
        write("job_message", name, &encode(m))?;
    }
    let chunk = TokenChunk {
        ids: vec![12, 345, 6789],
        text: " Paris.".into(),
        logprobs: Vec::new(),
        prompt_logprobs: Vec::new(),
    };
    let usage = JobUsage {
        prompt_tokens: 7,
        completion_tokens: 3,
        finish: Finish::Stop,
        decode_tokens_per_s_milli: 41_500,
        price_coefficient_milli: 1_000,
        cached_tokens: 0,
    };
    let ack = ChequeAck {
        cumulative_nano: 1_250_000,
        outstanding_nano: 0,
    };
    write("job_message", "token-chunk", &encode(&chunk))?;
    write("job_message", "usage", &encode(&usage))?;
    write("job_message", "cheque-ack", &encode(&ack))?;

    let request = |m: &JobMessage| WireFrame::Request {
        version: silk_overlay::JOB_WIRE_VERSION,
        request: encode(m),
    };
    write("job_frame", "request", &stream(&[request(&messages[1].1)])?)?;
    write(
        "job_frame",
        "tokens-then-end",
        &stream(&[
            WireFrame::Data(encode(&chunk)),
            WireFrame::Data(encode(&chunk)),
            WireFrame::End(encode(&usage)),
        ])?,
    )?;
    write(
        "job_frame",
        "cheque-then-ack",
        &stream(&[request(&messages[2].1), WireFrame::End(encode(&ack))])?,
    )?;
    write(
        "job_frame",
        "errors",
        &stream(&[
            WireFrame::Error {
                code: JobErrorCode::Application(silk_node::protocol::ERR_BAD_CHEQUE),
                message: "no job of this worker ran on lane 7".into(),
            },
            WireFrame::Error {
                code: JobErrorCode::Busy,
                message: "no free job slot".into(),
            },
        ])?,
    )?;
    Ok(())
}

fn gossip_and_reputation_seeds() -> Result<()> {
    let worker = seeded_keypair(2);
    let announcement = Announcement {
        peer_id: worker.public().to_peer_id(),
        models: vec!["smollm2-135m@sha256:0123456789abcdef".into()],
        context_windows: vec![8192],
        free_slots: 4,
        queue_depth: 1,
        decode_tokens_per_s_milli: 41_500,
        price_coefficient_milli: 1_000,
        attestation_mode: GossipMode::Tdx,
        attestation_digest: Some([9; 32]),
        seq: 17,
        expires_at_ms: 1_800_000_000_000,
        payout: Some(Address::new(0, [2; 32]).to_raw()),
        coordinate: Some(silk_overlay::Coordinate {
            vec: [12_000, -3_500, 800, 0],
            height_us: 1_500,
            error_milli: 400,
        }),
    };
    let signed = SignedEnvelope::sign_announcement(&worker, &announcement)?;
    assert_eq!(signed.verify_announcement()?, announcement);
    write("gossip_envelope", "announcement", &signed.to_bytes()?)?;

    // A gateway's own report, made by the node's encoder; the reporter
    // (seed 1) is the one the fuzz target gives standing.
    let mut book = Reputation::default();
    for (seed, ok) in [(2, true), (2, true), (3, false), (4, true), (1, true)] {
        book.record(seeded_keypair(seed).public().to_peer_id(), ok);
    }
    book.decay();
    let report = book.report(1_800_000_000_000).ok_or("empty report")?;
    let payload = postcard::to_stdvec(&report)?;
    write("reputation_report", "report", &payload)?;
    let reporter = seeded_keypair(1);
    let envelope = SignedEnvelope::sign_reputation(&reporter, payload)?;
    assert_eq!(envelope.verify_reputation()?, silk_fuzz::reporter());
    write("gossip_envelope", "reputation", &envelope.to_bytes()?)?;
    Ok(())
}

fn attest_seeds() -> Result<()> {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../node/tests/fixtures/attest");
    let quote = std::fs::read(fixtures.join("tdx_quote"))?;
    let collateral: dcap_qvl::QuoteCollateralV3 =
        serde_json::from_slice(&std::fs::read(fixtures.join("tdx_quote_collateral.json"))?)?;
    write("tdx_quote", "sample", &quote)?;
    let claims = Claims::new(
        Hex([42; 32]),
        vec!["smollm2-135m".to_string()],
        silk_node::attest::NODE_VERSION,
        silk_fuzz::ATTEST_AT,
    )?;
    write(
        "attestation_document",
        "insecure",
        &AttestationDocument::insecure(claims.clone()).encode()?,
    )?;
    let tdx = AttestationDocument {
        mode: AttestationMode::Tdx,
        claims,
        quote: Some(quote),
        collateral: None,
    };
    write("attestation_document", "tdx-no-collateral", &tdx.encode()?)?;
    let with = AttestationDocument {
        collateral: Some(collateral),
        ..tdx
    };
    write(
        "attestation_document",
        "tdx-with-collateral",
        &with.encode()?,
    )?;
    Ok(())
}

fn cheque_seeds() -> Result<()> {
    let d = delivery()?;
    write("cheque", "delivery-postcard", &encode(&d))?;
    write("cheque", "signed-json", &serde_json::to_vec(&d.cheque)?)?;
    write("cheque", "delivery-json", &serde_json::to_vec(&d)?)?;
    Ok(())
}

fn http(body: &str) -> Vec<u8> {
    format!(
        "POST /api/v2/jsonRPC HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn devnet_seeds() -> Result<()> {
    let wallet = silk_fuzz::devnet_wallet().ok_or("no wallet")?;
    let address = wallet.address().to_raw();
    let b64 = base64::engine::general_purpose::STANDARD;
    let transfer = wallet_transfer(
        wallet,
        0,
        silk_fuzz::DEVNET_START + 600,
        &[OutMessage {
            dest: Address::new(0, [9; 32]),
            value: Coins(1_000_000),
            bounce: false,
            body: None,
            state_init: None,
        }],
    )?;
    let boc = b64.encode(to_boc(&transfer)?);
    let cell = b64.encode(to_boc(
        &silk_chain::tonlib_core::cell::CellBuilder::new()
            .store_u32(32, 7)?
            .build()?,
    )?);
    let bodies = [
        (
            "send-boc",
            serde_json::json!({"id": 1, "jsonrpc": "2.0", "method": "sendBoc", "params": {"boc": boc}}),
        ),
        (
            "address-information",
            serde_json::json!({"id": 2, "jsonrpc": "2.0", "method": "getAddressInformation", "params": {"address": address}}),
        ),
        (
            "transactions",
            serde_json::json!({"id": 3, "jsonrpc": "2.0", "method": "getTransactions", "params": {"address": address, "limit": 5}}),
        ),
        (
            "config-param",
            serde_json::json!({"id": 5, "jsonrpc": "2.0", "method": "getConfigParam", "params": {"config_id": 19}}),
        ),
        (
            "run-get-method",
            serde_json::json!({"id": 4, "jsonrpc": "2.0", "method": "runGetMethod", "params": {"address": address, "method": "seqno", "stack": [["num", "0x10"], ["num", "-5"], ["tvm.Cell", cell], ["tvm.Slice", cell]]}}),
        ),
    ];
    for (name, body) in &bodies {
        write("devnet_http", name, &http(&body.to_string()))?;
    }
    write("devnet_http", "not-json", &http("{\"method\": sendBoc"))?;
    write(
        "devnet_http",
        "too-large",
        b"POST /api/v2/jsonRPC HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n{}",
    )?;
    Ok(())
}

/// The GGUF id of a storage type.
fn raw_type(kind: TensorType) -> u32 {
    match kind {
        TensorType::F32 => 0,
        TensorType::F16 => 1,
        TensorType::Q4_0 => 2,
        TensorType::Q4_1 => 3,
        TensorType::Q5_0 => 6,
        TensorType::Q5_1 => 7,
        TensorType::Q8_0 => 8,
        TensorType::Q4K => 12,
        TensorType::Q5K => 13,
        TensorType::Q6K => 14,
        TensorType::BF16 => 30,
        TensorType::Other(raw) => raw,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The GGUF type a parsed value is written back as.
fn value_type(v: &Value) -> u32 {
    match v {
        Value::U64(x) if u32::try_from(*x).is_ok() => 4,
        Value::U64(_) => 10,
        Value::I64(x) if i32::try_from(*x).is_ok() => 5,
        Value::I64(_) => 11,
        Value::F64(_) => 6,
        Value::Bool(_) => 7,
        Value::Str(_) => 8,
        Value::Array(_) => 9,
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value, max_items: usize) {
    match v {
        Value::U64(x) => match u32::try_from(*x) {
            Ok(x) => out.extend_from_slice(&x.to_le_bytes()),
            Err(_) => out.extend_from_slice(&x.to_le_bytes()),
        },
        Value::I64(x) => match i32::try_from(*x) {
            Ok(x) => out.extend_from_slice(&x.to_le_bytes()),
            Err(_) => out.extend_from_slice(&x.to_le_bytes()),
        },
        Value::F64(x) => out.extend_from_slice(&(*x as f32).to_le_bytes()),
        Value::Bool(b) => out.push(u8::from(*b)),
        Value::Str(s) => put_str(out, s),
        Value::Array(items) => {
            let kept = &items[..items.len().min(max_items)];
            let kind = kept.first().map_or(4, value_type);
            // Homogeneous on the wire: every item is written as the first's type.
            out.extend_from_slice(&kind.to_le_bytes());
            out.extend_from_slice(&(kept.len() as u64).to_le_bytes());
            for item in kept {
                put_value(out, item, max_items);
            }
        }
    }
}

/// A small GGUF file: `file`'s metadata with arrays cut to `max_items`, and
/// the first row of each of `tensors`.
fn small_gguf(file: &GgufFile, tensors: &[&str], max_items: usize) -> Result<Vec<u8>> {
    // Arrays whose items change type cannot be written back; they are left out.
    let uniform = |v: &Value| match v {
        Value::Array(items) => items
            .iter()
            .all(|i| value_type(i) == items.first().map_or(4, value_type)),
        _ => true,
    };
    let mut kv = Vec::new();
    let mut n_kv = 0u64;
    for (key, value) in file.metadata.iter().filter(|(_, v)| uniform(v)) {
        put_str(&mut kv, key);
        kv.extend_from_slice(&value_type(value).to_le_bytes());
        put_value(&mut kv, value, max_items);
        n_kv += 1;
    }
    let mut table = Vec::new();
    let mut data = Vec::new();
    for name in tensors {
        let (info, bytes) = file.tensor_bytes(name)?;
        let rows: u64 = info.dims.iter().skip(1).product();
        let row = bytes.len() / usize::try_from(rows.max(1))?;
        put_str(&mut table, name);
        table.extend_from_slice(&1u32.to_le_bytes());
        table.extend_from_slice(&info.dims[0].to_le_bytes());
        table.extend_from_slice(&raw_type(info.kind).to_le_bytes());
        table.extend_from_slice(&(data.len() as u64).to_le_bytes());
        data.extend_from_slice(&bytes[..row]);
        data.resize(data.len().div_ceil(32) * 32, 0);
    }
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&n_kv.to_le_bytes());
    out.extend_from_slice(&kv);
    out.extend_from_slice(&table);
    out.resize(out.len().div_ceil(32) * 32, 0);
    out.extend_from_slice(&data);
    Ok(out)
}

fn gguf_seeds(model: Option<PathBuf>) -> Result<()> {
    let Some(path) = model.or_else(|| std::env::var_os("SILK_GGUF").map(PathBuf::from)) else {
        eprintln!("no GGUF model given: GGUF seeds not written");
        return Ok(());
    };
    let file = GgufFile::open(&path)?;
    // One tensor of each storage type, the first by name.
    let mut picked: Vec<(u32, &str)> = Vec::new();
    for (name, info) in &file.tensors {
        if !picked.iter().any(|(k, _)| *k == raw_type(info.kind)) {
            picked.push((raw_type(info.kind), name));
        }
    }
    let names: Vec<&str> = picked.iter().map(|(_, n)| *n).collect();
    let small = small_gguf(&file, &names, 8)?;
    let parsed = GgufFile::from_bytes(small.clone(), Path::new("seed.gguf"))?;
    for name in &names {
        parsed.tensor_f32(name)?;
    }
    write("gguf", "model-small", &small)?;
    write("gguf", "model-metadata-only", &small_gguf(&file, &[], 2)?)?;
    // The real file's first 60 KiB: its header, cut short.
    let head = std::fs::read(&path)?;
    write("gguf", "model-head-60k", &head[..head.len().min(60 * 1024)])?;
    Ok(())
}

fn main() -> Result<()> {
    job_seeds()?;
    gossip_and_reputation_seeds()?;
    attest_seeds()?;
    cheque_seeds()?;
    devnet_seeds()?;
    gguf_seeds(std::env::args_os().nth(1).map(PathBuf::from))?;
    for (name, target) in silk_fuzz::TARGETS {
        for entry in std::fs::read_dir(corpus().join(name))? {
            target(&std::fs::read(entry?.path())?);
        }
    }
    println!("seeds written under {}", corpus().display());
    Ok(())
}
