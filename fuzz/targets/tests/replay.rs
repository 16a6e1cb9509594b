//! Replays every fuzz corpus on stable: each file of `fuzz/corpus/<target>/`
//! and `fuzz/regressions/<target>/` goes through the target's body. Fails
//! when a corpus directory is missing or empty, so it cannot pass by
//! finding nothing.

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

#[test]
fn every_corpus_replays_without_a_panic() {
    for (name, target) in silk_fuzz::TARGETS {
        let corpus = fuzz_dir().join("corpus").join(name);
        assert!(
            corpus.is_dir(),
            "{} is missing: every target needs a corpus",
            corpus.display()
        );
        let mut inputs = files(&corpus);
        assert!(
            !inputs.is_empty(),
            "{} is empty: every target needs a corpus",
            corpus.display()
        );
        let regressions = fuzz_dir().join("regressions").join(name);
        if regressions.is_dir() {
            inputs.extend(files(&regressions));
        }
        for input in &inputs {
            let bytes = std::fs::read(input).expect("read a corpus file");
            let run = std::panic::catch_unwind(|| target(&bytes));
            assert!(run.is_ok(), "{name} panicked on {}", input.display());
        }
    }
}

#[test]
fn every_fuzz_binary_is_a_target() {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut binaries: Vec<String> = files(&dir)
        .iter()
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_owned()))
        .collect();
    binaries.sort();
    let mut targets: Vec<String> = silk_fuzz::TARGETS
        .iter()
        .map(|(n, _)| (*n).to_owned())
        .collect();
    targets.sort();
    assert_eq!(
        binaries, targets,
        "fuzz/fuzz_targets/ and silk_fuzz::TARGETS differ"
    );
}
