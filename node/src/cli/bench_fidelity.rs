//! `silk bench fidelity`: the reference checks of the test suite, run on any
//! device and precision, so a GPU (where no test runs) is held to the same
//! fixtures: transformers' logits and greedy tokens on the tiny Llama and
//! Qwen3 models, and the teacher-forced KL divergence on the default GGUF.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use silk_inference::backend::{on_device, Backend, Device, OnBackend};
use silk_inference::fidelity::{
    check_fidelity, check_fixture, Fidelity, FidelityReport, FixtureReport,
};
use silk_inference::model::{LoadedModel, ModelFormat};
use silk_inference::{CpuKernels, ModelSource, ModelStore, Precision, WeightLayout};

/// Arguments of `silk bench fidelity`.
#[derive(Debug, Args)]
pub struct FidelityArgs {
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Precisions to check, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
    pub dtype: Vec<Precision>,
    /// The fixtures directory (`tiny-llama`, `tiny-qwen3`, `smollm2-q4_1`).
    #[arg(long, default_value = "inference/tests/fixtures")]
    pub fixtures: PathBuf,
    /// The GGUF model `smollm2-q4_1/fidelity.json` was measured on (name or
    /// path); `none` skips it.
    #[arg(long, default_value = silk_inference::DEFAULT_MODEL)]
    pub model: String,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Everything one run checked.
#[derive(Debug, serde::Serialize)]
struct Report {
    machine: String,
    device: String,
    runs: Vec<PrecisionRun>,
}

#[derive(Debug, serde::Serialize)]
struct PrecisionRun {
    dtype: String,
    fixtures: Vec<FixtureReport>,
    /// The default GGUF, dequantized to this precision on the device.
    gguf: Option<GgufRun>,
}

#[derive(Debug, serde::Serialize)]
struct GgufRun {
    model: String,
    seconds: f64,
    #[serde(flatten)]
    report: FidelityReport,
    /// Held to llama.cpp's own agreement on the same file.
    pass: bool,
}

/// One precision's checks on the chosen backend.
struct Job<'a> {
    precision: Precision,
    fixtures: &'a Path,
    gguf: Option<&'a ModelSource>,
}

impl OnBackend for Job<'_> {
    type Output = PrecisionRun;

    fn run<B: Backend>(self, device: &B::Device) -> silk_inference::Result<PrecisionRun> {
        let load = |source: ModelSource| {
            LoadedModel::<B>::load_with(
                source,
                WeightLayout::Dense,
                CpuKernels::best(),
                self.precision,
                device,
            )
        };
        let mut fixtures = Vec::new();
        for name in ["tiny-llama", "tiny-qwen3"] {
            let dir = self.fixtures.join(name);
            let model = load(ModelSource::from_path(&dir)?)?;
            fixtures.push(check_fixture(&model, &dir, self.precision)?);
        }
        let gguf = match self.gguf {
            None => None,
            Some(source) => {
                let fidelity =
                    Fidelity::read(&self.fixtures.join("smollm2-q4_1").join("fidelity.json"))?;
                if !source.id.ends_with(&fidelity.sha256) {
                    return Err(silk_inference::InferenceError::Backend(format!(
                        "{} is not the file fidelity.json was measured on (sha256 {})",
                        source.id, fidelity.sha256
                    )));
                }
                let model = load(source.clone())?;
                let started = Instant::now();
                let report = check_fidelity(&model, &fidelity)?;
                // Both precisions as faithful as llama.cpp's own path on
                // the file, and every decided position the reference's
                // token. The share of the same top token is held only in
                // f32: bf16 measured 0.9713 against llama.cpp's 0.9656 on
                // the CPU, four positions in 697, too close to hold another
                // device's rounding to.
                let pass = report.mean_kld <= report.llama_cpp_mean_kld
                    && report.decided_agree == report.decided
                    && (self.precision != Precision::F32
                        || report.same_top1 >= report.llama_cpp_same_top1);
                Some(GgufRun {
                    model: source.id.clone(),
                    seconds: started.elapsed().as_secs_f64(),
                    report,
                    pass,
                })
            }
        };
        Ok(PrecisionRun {
            dtype: self.precision.to_string(),
            fixtures,
            gguf,
        })
    }
}

/// Runs `silk bench fidelity`: prints a table, writes the JSON report, and
/// fails when any check misses its bar.
pub fn run(args: FidelityArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let gguf = match args.model.as_str() {
        "none" => None,
        model => {
            let source = ModelStore::new(data_dir.join("models"))
                .resolve(model)
                .with_context(|| format!("{model} (pass --model none to skip it)"))?;
            anyhow::ensure!(
                matches!(source.format, ModelFormat::Gguf(_)),
                "--model takes the GGUF file fidelity.json was measured on"
            );
            Some(source)
        }
    };
    let mut report = Report {
        machine: super::bench::machine(),
        device: format!("{:?}", args.device),
        runs: Vec::new(),
    };
    for &precision in &args.dtype {
        eprintln!("checking {precision} on {:?}", args.device);
        let job = Job {
            precision,
            fixtures: &args.fixtures,
            gguf: gguf.as_ref(),
        };
        report.runs.push(on_device(args.device, job)?);
    }
    let failed = print(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if failed > 0 {
        eprintln!("{failed} check(s) missed their bar");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the report as tables; returns how many checks failed.
fn print(report: &Report) -> usize {
    println!(
        "## silk bench fidelity\n\n- machine: {}; device: {}\n",
        report.machine, report.device
    );
    println!("| dtype | model/case | max Δlogit, last position (bound) | every position (bound) | greedy agree (decided) | pass |");
    println!("|---|---|---:|---:|---:|---|");
    let mut failed = 0;
    for run in &report.runs {
        for fixture in &run.fixtures {
            for c in &fixture.cases {
                let r = &c.report;
                failed += usize::from(!c.pass);
                let all = r.all_positions_diff.map_or("-".to_string(), |d| {
                    format!("{d:.5} ({:.5})", c.all_positions_bound)
                });
                println!(
                    "| {} | {}/{} | {:.5} ({:.5}) | {all} | {}/{} ({}) | {} |",
                    run.dtype,
                    fixture.fixture,
                    r.name,
                    r.last_logit_diff,
                    c.bound,
                    r.agreeing(),
                    r.expected.len(),
                    r.decided,
                    if c.pass { "yes" } else { "NO" }
                );
            }
        }
    }
    let gguf: Vec<_> = report
        .runs
        .iter()
        .filter_map(|r| r.gguf.as_ref().map(|g| (&r.dtype, g)))
        .collect();
    if !gguf.is_empty() {
        println!(
            "\n| dtype | GGUF | positions | mean KLD | same top-1 | PPL (reference) | decided agree | s | pass |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|---:|---|");
        for (dtype, g) in gguf {
            let r = &g.report;
            failed += usize::from(!g.pass);
            println!(
                "| {dtype} | {} | {} | {:.6} (llama.cpp {:.6}) | {:.4} (llama.cpp {:.4}) | {:.4} ({:.4}) | {}/{} | {:.1} | {} |",
                g.model.split('@').next().unwrap_or(&g.model),
                r.positions,
                r.mean_kld,
                r.llama_cpp_mean_kld,
                r.same_top1,
                r.llama_cpp_same_top1,
                r.ppl,
                r.reference_ppl,
                r.decided_agree,
                r.decided,
                g.seconds,
                if g.pass { "yes" } else { "NO" }
            );
        }
    }
    failed
}
