//! Constrained decoding: what a request's answer must parse as (any JSON
//! object, a JSON schema, or a call of one of its tools), turned into a token mask at every step by
//! `llguidance`, the engine llama.cpp, vLLM and SGLang use. The mask is
//! computed from the model's own vocabulary, so a token that would make the
//! answer leave the grammar is never sampled; when the grammar is complete
//! the answer ends.
//!
//! The vocabulary is handed to llguidance once per engine as a token trie
//! of each token's bytes ([`Grammars::new`]); each request with a
//! constraint gets its own matcher ([`Grammars::matcher`]), built when the
//! request is submitted so a schema llguidance cannot compile is refused
//! at once, naming `response_format`.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::error::{InferenceError, Result};
use crate::tokenizer::Tokenizer;
use crate::tools::{Tool, MAX_PARALLEL_TOOL_CALLS, TOOL_CALL_CLOSE, TOOL_CALL_OPEN};

/// What an answer must be.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Constraint {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON value valid against this schema, as JSON text.
    JsonSchema(String),
    /// One call of one of `tools` in the Hermes format
    /// (`<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`, see
    /// [`crate::tools`]), its arguments valid against that function's
    /// schema; with `parallel`, up to
    /// [`crate::tools::MAX_PARALLEL_TOOL_CALLS`] calls, one per line
    /// (`tool_choice` `required` or a named function).
    ToolCalls {
        /// The functions it may call (at least one).
        tools: Vec<Tool>,
        /// Whether it may make more than one call.
        parallel: bool,
    },
}

/// Largest schema accepted, in bytes.
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;

impl Constraint {
    /// The grammar llguidance compiles.
    fn grammar(&self) -> Result<TopLevelGrammar> {
        match self {
            Constraint::ToolCalls { tools, parallel } => Ok(TopLevelGrammar::from_lark(
                tool_calls_lark(tools, *parallel)?,
            )),
            _ => Ok(TopLevelGrammar::from_json_schema(self.schema()?)),
        }
    }

    /// The request field a grammar that cannot be enforced comes from.
    fn field(&self) -> &'static str {
        match self {
            Constraint::ToolCalls { .. } => "tools",
            _ => "response_format",
        }
    }

    /// The schema llguidance compiles: compact JSON (no free whitespace,
    /// which a model could otherwise emit until `max_tokens` runs out).
    fn schema(&self) -> Result<serde_json::Value> {
        let mut schema = match self {
            Constraint::JsonObject => serde_json::json!({ "type": "object" }),
            Constraint::ToolCalls { .. } => {
                return Err(invalid("tool calls have a grammar, not a schema".into()))
            }
            Constraint::JsonSchema(text) => {
                if text.len() > MAX_SCHEMA_BYTES {
                    return Err(invalid(format!(
                        "the schema is {} bytes, at most {MAX_SCHEMA_BYTES} are allowed",
                        text.len()
                    )));
                }
                serde_json::from_str(text)
                    .map_err(|e| invalid(format!("the schema is not JSON: {e}")))?
            }
        };
        let Some(object) = schema.as_object_mut() else {
            return Err(invalid("the schema must be a JSON object".into()));
        };
        object.insert(
            "x-guidance".into(),
            serde_json::json!({ "whitespace_flexible": false, "item_separator": ",", "key_separator": ":" }),
        );
        Ok(schema)
    }
}

/// The Lark grammar of one (or, with `parallel`, up to
/// [`MAX_PARALLEL_TOOL_CALLS`]) calls of `tools`: each call's JSON is an
/// object with the function's name as a constant and its arguments under
/// its schema, written as the chat templates write calls (`", "` and
/// `": "` between items).
fn tool_calls_lark(tools: &[Tool], parallel: bool) -> Result<String> {
    if tools.is_empty() {
        return Err(InferenceError::InvalidRequest {
            field: "tools",
            reason: "a required tool call needs at least one function".into(),
        });
    }
    crate::tools::check_tools(tools)?;
    let mut lark = if parallel {
        format!(
            "start: call (\"\\n\" call){{0,{}}}\n",
            MAX_PARALLEL_TOOL_CALLS - 1
        )
    } else {
        "start: call\n".to_string()
    };
    let alternatives: Vec<String> = (0..tools.len()).map(|i| format!("f{i}")).collect();
    lark.push_str(&format!(
        "call: \"{TOOL_CALL_OPEN}\\n\" ({}) \"\\n{TOOL_CALL_CLOSE}\"\n",
        alternatives.join(" | ")
    ));
    for (i, tool) in tools.iter().enumerate() {
        // A function declared without parameters takes none (the chat
        // template shows it an empty object schema).
        let mut arguments = if tool.parameters.trim().is_empty() {
            serde_json::json!({ "type": "object", "properties": {}, "additionalProperties": false })
        } else {
            tool.schema()?
        };
        let mut schema = serde_json::json!({
            "type": "object",
            "properties": { "name": { "const": tool.name } },
            "required": ["name", "arguments"],
            "additionalProperties": false,
            "x-guidance": { "whitespace_flexible": false, "item_separator": ", ", "key_separator": ": " },
        });
        // References (`#/$defs/…`, what pydantic writes) resolve against
        // the root, which is now the call's object: the definitions move
        // there with them.
        for key in ["$defs", "definitions"] {
            if let Some(defs) = arguments.as_object_mut().and_then(|o| o.remove(key)) {
                schema[key] = defs;
            }
        }
        schema["properties"]["arguments"] = arguments;
        lark.push_str(&format!("f{i}: %json {schema}\n"));
    }
    Ok(lark)
}

fn invalid(reason: String) -> InferenceError {
    InferenceError::InvalidRequest {
        field: "response_format",
        reason,
    }
}

/// The model's vocabulary as llguidance sees it.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Only used for text llguidance forces; byte-exact for the
        // byte-level vocabularies silk serves.
        self.tokenizer
            .encode(&String::from_utf8_lossy(s), false)
            .unwrap_or_else(|_| self.trie.greedy_tokenize(s))
    }
}

/// Builds matchers for one model's vocabulary.
pub struct Grammars {
    factory: ParserFactory,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").finish_non_exhaustive()
    }
}

impl Grammars {
    /// Hands the first `vocab` tokens of `tokenizer` to llguidance (special
    /// tokens marked as such, so no grammar can produce one).
    pub fn new(tokenizer: Arc<Tokenizer>, vocab: usize) -> Result<Self> {
        let eos = tokenizer.stop_ids().iter().next().copied().unwrap_or(0);
        let words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| {
                if tokenizer.is_special(id) {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend(tokenizer.token_bytes(id));
                    w
                } else {
                    tokenizer.token_bytes(id)
                }
            })
            .collect();
        let info = TokRxInfo::new(vocab as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(Vocabulary { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| InferenceError::Tokenizer(format!("llguidance: {e}")))?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// A fresh matcher for `constraint`; a schema llguidance cannot compile
    /// is refused naming `response_format`.
    pub fn matcher(&self, constraint: &Constraint) -> Result<Matcher> {
        let field = constraint.field();
        let refused = |e: String| InferenceError::InvalidRequest {
            field,
            reason: format!("the schema cannot be enforced: {e}"),
        };
        let parser = self
            .factory
            .create_parser(constraint.grammar()?)
            .map_err(|e| refused(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(refused(e));
        }
        Ok(matcher)
    }
}

/// Sets every logit the matcher does not allow next to -inf, in place.
/// Errors when the matcher is in error (it never allows nothing while
/// healthy).
pub fn apply_mask(matcher: &mut Matcher, logits: &mut [f32]) -> Result<()> {
    let mask = matcher
        .compute_mask()
        .map_err(|e| InferenceError::Grammar(e.to_string()))?;
    // Rows past the vocabulary handed to llguidance (padding rows of the
    // embedding table) are never allowed.
    let known = mask.len();
    for (i, l) in logits.iter_mut().enumerate() {
        if i >= known || !mask.is_allowed(i as TokenId) {
            *l = f32::NEG_INFINITY;
        }
    }
    Ok(())
}
