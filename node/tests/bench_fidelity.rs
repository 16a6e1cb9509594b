//! `silk bench fidelity` holds the engine to the reference fixtures on a
//! chosen device and precision (here the CPU, where it can run), and fails
//! when a fixture says otherwise.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../inference/tests/fixtures")
}

fn bench(fixtures: &Path, json: &Path) -> Output {
    let data = tempfile::tempdir().expect("temp dir");
    Command::new(env!("CARGO_BIN_EXE_silk"))
        .arg("--data-dir")
        .arg(data.path())
        .args([
            "bench", "fidelity", "--model", "none", "--dtype", "f32,bf16",
        ])
        .arg("--fixtures")
        .arg(fixtures)
        .arg("--json")
        .arg(json)
        .output()
        .expect("run silk bench fidelity")
}

fn report(json: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(json).expect("report")).expect("JSON report")
}

/// Each (precision, case) of the report, with whether it passed.
fn cases(report: &serde_json::Value) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    for run in report["runs"].as_array().expect("runs") {
        for fixture in run["fixtures"].as_array().expect("fixtures") {
            for case in fixture["cases"].as_array().expect("cases") {
                out.push((
                    run["dtype"].as_str().expect("dtype").to_string(),
                    format!(
                        "{}/{}",
                        fixture["fixture"].as_str().expect("fixture"),
                        case["name"].as_str().expect("name")
                    ),
                    case["pass"].as_bool().expect("pass"),
                ));
            }
        }
    }
    out
}

#[test]
fn both_precisions_pass_every_fixture_case_on_the_cpu() {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("fidelity.json");
    let out = bench(&fixtures(), &json);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cases = cases(&report(&json));
    assert_eq!(
        cases.len(),
        16,
        "2 precisions × 2 models × 4 cases: {cases:?}"
    );
    assert!(cases.iter().all(|(_, _, pass)| *pass), "{cases:?}");
    assert!(stdout.contains("| bf16 | tiny-qwen3/chat |"), "{stdout}");
}

/// A reference logit moved by 0.01 (ten times the f32 tolerance) fails that
/// case in f32 and the run as a whole; bf16, whose bound is the size of
/// transformers' own bf16 error, still passes it.
#[test]
fn a_case_off_the_reference_fails_the_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("fixtures");
    for name in ["tiny-llama", "tiny-qwen3"] {
        let (from, to) = (fixtures().join(name), copy.join(name));
        std::fs::create_dir_all(&to).expect("mkdir");
        for entry in std::fs::read_dir(&from).expect("fixture dir") {
            let path = entry.expect("entry").path();
            std::fs::copy(&path, to.join(path.file_name().expect("name"))).expect("copy");
        }
    }
    let expected = copy.join("tiny-llama/expected.json");
    let mut value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&expected).expect("read")).expect("json");
    let logit = &mut value["cases"][2]["last_logits"][7];
    *logit = serde_json::json!(logit.as_f64().expect("logit") + 0.01);
    std::fs::write(&expected, serde_json::to_vec(&value).expect("json")).expect("write");

    let json = dir.path().join("fidelity.json");
    let out = bench(&copy, &json);
    assert!(!out.status.success(), "a moved reference logit passed");
    let failed: Vec<_> = cases(&report(&json))
        .into_iter()
        .filter(|(_, _, pass)| !pass)
        .collect();
    assert_eq!(
        failed,
        vec![("f32".to_string(), "tiny-llama/text2".to_string(), false)]
    );
}
