//! The `silk` binary: parses the command line and runs it.

fn main() -> anyhow::Result<std::process::ExitCode> {
    // Fail points exist only in what `cargo test` builds (the crash tests
    // name them in `FAILPOINTS`, docs/RELIABILITY.md lists them); a
    // `cargo build` binary never reads that variable.
    let _failpoints = fail::has_failpoints().then(fail::FailScenario::setup);
    silk_node::cli::run()
}
