//! The gateway's own judgement of whether a request fits a model's context
//! window, made before the job goes to any worker.
//!
//! Workers announce each model's context window. The gateway counts the
//! prompt's tokens exactly when it holds the model's tokenizer (it serves
//! the same model id, or the file is in its models directory) and compares
//! with the engine's rules: a prompt of `window` tokens or more, or a
//! `max_tokens` above the window, can never run. A request that fits no
//! worker's window is the caller's error: a `400 context_length_exceeded`
//! at once, no worker asked, no reputation touched. Without the tokenizer
//! only `max_tokens` is judged here and the worker judges the prompt (its
//! refusal is the caller's fault too; see `Blame::Caller`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use silk_inference::{Engine, ModelStore, Prompt, Tokenizer};

use super::models::model_name;

/// A model missing from the models directory is looked for again after this.
const MISSING_MODEL_RETRY: Duration = Duration::from_secs(60);

/// Whether a request with `prompt_tokens` (when counted) and `max_tokens`
/// can run in a context window of `window` tokens, by the engine's rules.
pub fn fits(window: u32, prompt_tokens: Option<u64>, max_tokens: u32) -> bool {
    max_tokens <= window && prompt_tokens.is_none_or(|p| p < u64::from(window))
}

/// A tokenizer looked for in the models directory: when, and what was found.
type Loaded = (Instant, Option<Arc<Tokenizer>>);

/// Counts prompt tokens with the tokenizer of a model id, when this node
/// has it.
pub struct PromptCounter {
    models_dir: PathBuf,
    /// This node's own engine and the model id it serves.
    own: Option<(String, Engine)>,
    /// Tokenizers read from the models directory, by model id; `None` when
    /// the id is not there (remembered for [`MISSING_MODEL_RETRY`]).
    loaded: Mutex<HashMap<String, Loaded>>,
}

impl std::fmt::Debug for PromptCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptCounter")
            .field("models_dir", &self.models_dir)
            .field("own", &self.own.as_ref().map(|(id, _)| id))
            .finish_non_exhaustive()
    }
}

impl PromptCounter {
    /// A counter that uses `own` (a served model id and its engine) and the
    /// models in `models_dir`.
    pub fn new(models_dir: PathBuf, own: Option<(String, Engine)>) -> Self {
        Self {
            models_dir,
            own,
            loaded: Mutex::default(),
        }
    }

    /// The tokens `prompt` makes for `model`, or `None` when this node does
    /// not hold the model's tokenizer or cannot tokenize the prompt (the
    /// worker then judges). Tokenizing runs off the async runtime.
    pub async fn count(&self, model: &str, prompt: Prompt) -> Option<u64> {
        if let Some((id, engine)) = &self.own {
            if id == model {
                let engine = engine.clone();
                return tokio::task::spawn_blocking(move || engine.tokenize(&prompt).ok())
                    .await
                    .ok()
                    .flatten()
                    .map(|ids| ids.len() as u64);
            }
        }
        let tokenizer = self.tokenizer(model).await?;
        tokio::task::spawn_blocking(move || silk_inference::prompt_ids(&tokenizer, &prompt).ok())
            .await
            .ok()
            .flatten()
            .map(|ids| ids.len() as u64)
    }

    async fn tokenizer(&self, model: &str) -> Option<Arc<Tokenizer>> {
        if let Ok(loaded) = self.loaded.lock() {
            if let Some((at, t)) = loaded.get(model) {
                if t.is_some() || at.elapsed() < MISSING_MODEL_RETRY {
                    return t.clone();
                }
            }
        }
        let store = ModelStore::new(&self.models_dir);
        let id = model.to_string();
        let found = tokio::task::spawn_blocking(move || {
            // The id pins the weights' hash: a file of the same name with
            // other weights (or another tokenizer) is not this model.
            let source = store.resolve(model_name(&id)).ok()?;
            if source.id != id {
                return None;
            }
            source.tokenizer().ok().map(Arc::new)
        })
        .await
        .ok()
        .flatten();
        if let Ok(mut loaded) = self.loaded.lock() {
            loaded.insert(model.to_string(), (Instant::now(), found.clone()));
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_fits_by_the_engines_rules() {
        // The engine refuses a prompt of `window` tokens or more, and a
        // max_tokens above the window; it stops generation at the window.
        assert!(fits(8192, Some(8191), 8192));
        assert!(!fits(8192, Some(8192), 1));
        assert!(!fits(8192, Some(10), 8193));
        assert!(fits(8192, None, 8192));
        assert!(!fits(8192, None, 8193));
        assert!(fits(2048, Some(2000), 1000));
    }

    #[tokio::test]
    async fn a_model_that_is_not_installed_is_not_counted() {
        let dir = std::env::temp_dir().join(format!("silk-context-{}", std::process::id()));
        let counter = PromptCounter::new(dir, None);
        let n = counter
            .count("nothing@sha256:00", Prompt::Text("hello".into()))
            .await;
        assert_eq!(n, None);
    }
}
