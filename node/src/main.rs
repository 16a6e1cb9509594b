//! The `silk` binary: parses the command line and runs it.

fn main() -> anyhow::Result<std::process::ExitCode> {
    silk_node::cli::run()
}
