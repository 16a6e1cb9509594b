//! Text in and out: a `tokenizers` tokenizer (from `tokenizer.json` or built
//! from GGUF metadata), the model's chat template rendered with `minijinja`,
//! stop tokens, and incremental detokenization for streaming.

use std::collections::BTreeSet;
use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{InferenceError, Result};
use crate::gguf::{GgufFile, Value};
use crate::tools::{self, Tool, ToolCall};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text.
    pub content: String,
    /// The participant's name, for templates that use it.
    pub name: Option<String>,
    /// The calls an assistant message made.
    #[serde(default)]
    pub tool_calls: Vec<ToolCall>,
    /// The call a `tool` message answers.
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with a role and text only.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            name: None,
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// A model's tokenizer with its chat template and stop tokens.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    stop_ids: BTreeSet<u32>,
    /// Ids of the special added tokens, read once when first asked.
    special_ids: std::sync::OnceLock<BTreeSet<u32>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("stop_ids", &self.stop_ids)
            .finish_non_exhaustive()
    }
}

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn tok_err(e: impl std::fmt::Display) -> InferenceError {
    InferenceError::Tokenizer(e.to_string())
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`, and `tokenizer_config.json` (chat template,
    /// BOS/EOS) and `generation_config.json` (EOS ids) where present.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(InferenceError::format(
                &path,
                "missing: a Hugging Face model directory needs tokenizer.json",
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| InferenceError::format(&path, format!("bad tokenizer: {e}")))?;
        let read_json = |name: &str| -> Result<Option<serde_json::Value>> {
            let p = dir.join(name);
            if !p.exists() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&p).map_err(|e| InferenceError::io(&p, e))?;
            serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| InferenceError::format(&p, format!("not JSON: {e}")))
        };
        let config = read_json("tokenizer_config.json")?.unwrap_or_default();
        let chat_template = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take the default one.
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        let bos_token = token_string(config.get("bos_token"));
        let eos_token = token_string(config.get("eos_token"));
        let mut stop_ids = BTreeSet::new();
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            stop_ids.insert(id);
        }
        if let Some(gen) = read_json("generation_config.json")? {
            match gen.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => stop_ids.extend(n.as_u64().map(|v| v as u32)),
                Some(serde_json::Value::Array(a)) => {
                    stop_ids.extend(a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32))
                }
                _ => {}
            }
        }
        Ok(Self {
            inner,
            chat_template,
            bos_token,
            eos_token,
            stop_ids,
            special_ids: std::sync::OnceLock::new(),
        })
    }

    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*`
    /// metadata (byte-level BPE, as used by SmolLM2, Llama 3 and Qwen).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let path = file.path();
        let field = |k: &str| {
            file.get(k)
                .ok_or_else(|| InferenceError::format(path, format!("metadata `{k}` is missing")))
        };
        let model = field("tokenizer.ggml.model")?
            .as_str()
            .unwrap_or_default()
            .to_string();
        if model != "gpt2" {
            return Err(InferenceError::format(
                path,
                format!("tokenizer.ggml.model `{model}` is not supported (silk reads byte-level BPE, `gpt2`)"),
            ));
        }
        let tokens: Vec<String> = field("tokenizer.ggml.tokens")?
            .as_array()
            .ok_or_else(|| InferenceError::format(path, "tokenizer.ggml.tokens is not an array"))?
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                InferenceError::format(path, "tokenizer.ggml.tokens holds a non-string")
            })?;
        let merges: Vec<(String, String)> = field("tokenizer.ggml.merges")?
            .as_array()
            .ok_or_else(|| InferenceError::format(path, "tokenizer.ggml.merges is not an array"))?
            .iter()
            .map(|v| {
                let (a, b) = v.as_str()?.split_once(' ')?;
                Some((a.to_string(), b.to_string()))
            })
            .collect::<Option<_>>()
            .ok_or_else(|| {
                InferenceError::format(
                    path,
                    "tokenizer.ggml.merges holds an entry that is not `a b`",
                )
            })?;
        let types: Vec<u64> = file
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_default();
        let pre = file
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string();

        let vocab: tokenizers::models::bpe::Vocab = tokens.iter().cloned().zip(0u32..).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(matches!(pre.as_str(), "llama-bpe" | "llama3"))
            .build()
            .map_err(tok_err)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let split = |regex: &str| -> Result<PreTokenizerWrapper> {
            Ok(Split::new(
                SplitPattern::Regex(regex.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(tok_err)?
            .into())
        };
        let pre_tokenizer: PreTokenizerWrapper = match pre.as_str() {
            "default" | "gpt2" | "gpt-2" => byte_level.into(),
            "smollm" | "starcoder" | "refact" | "codeshell" => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
            "llama-bpe" | "llama3" | "smaug-bpe" => {
                Sequence::new(vec![split(LLAMA3_REGEX)?, ByteLevel::new(false, true, false).into()]).into()
            }
            "qwen2" => Sequence::new(vec![split(QWEN2_REGEX)?, ByteLevel::new(false, true, false).into()]).into(),
            other => {
                return Err(InferenceError::format(
                    path,
                    format!("tokenizer.ggml.pre `{other}` is not supported (gpt2, smollm, llama-bpe, qwen2)"),
                ))
            }
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control (3) and user-defined (4) tokens are matched whole, before BPE.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter().chain(std::iter::repeat(&1)))
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(s, &t)| AddedToken::from(s.clone(), t == 3))
            .collect();
        inner.add_special_tokens(&specials);

        let id_of = |k: &str| file.get(k).and_then(Value::as_u64).map(|v| v as u32);
        let name_of = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize)).cloned();
        let bos_id = id_of("tokenizer.ggml.bos_token_id");
        let eos_id = id_of("tokenizer.ggml.eos_token_id");
        let add_bos = matches!(
            file.get("tokenizer.ggml.add_bos_token"),
            Some(Value::Bool(true))
        );
        if let (true, Some(bos)) = (add_bos, bos_id) {
            let name = name_of(Some(bos)).unwrap_or_default();
            let processor = TemplateProcessing::builder()
                .try_single(format!("{name} $A"))
                .map_err(tok_err)?
                .special_tokens(vec![(name, bos)])
                .build()
                .map_err(tok_err)?;
            inner.with_post_processor(Some(processor));
        }
        let mut stop_ids: BTreeSet<u32> = eos_id.into_iter().collect();
        stop_ids.extend(id_of("tokenizer.ggml.eot_token_id"));
        Ok(Self {
            inner,
            chat_template: file
                .get("tokenizer.chat_template")
                .and_then(Value::as_str)
                .map(str::to_owned),
            bos_token: name_of(bos_id),
            eos_token: name_of(eos_id),
            stop_ids,
            special_ids: std::sync::OnceLock::new(),
        })
    }

    /// Token ids of `text`. `add_special` adds the BOS the model expects
    /// for raw text; rendered chat templates already hold theirs.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, add_special)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids`; `skip_special` leaves out special tokens (as
    /// completions do).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    /// The bytes token `id` stands for: a byte-level token's characters
    /// mapped back to bytes (GPT-2's table), so a token holding part of a
    /// character gives exactly its bytes; any other token's own text.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        let byte_level = matches!(
            self.inner.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        );
        // Special tokens (`<|im_end|>`) are printable ASCII, which the
        // alphabet maps to itself, so they come out as their text.
        if byte_level {
            let table = gpt2_unicode_to_byte();
            if let Some(bytes) = piece
                .chars()
                .map(|c| table.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
            {
                return bytes;
            }
        }
        piece.into_bytes()
    }

    /// Whether `id` is a special token (BOS, EOS, a chat-template marker),
    /// which no text ever encodes to.
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids
            .get_or_init(|| {
                self.inner
                    .get_added_tokens_decoder()
                    .into_iter()
                    .filter(|(_, t)| t.special)
                    .map(|(id, _)| id)
                    .collect()
            })
            .contains(&id)
    }

    /// Ids that end generation (EOS, end-of-turn).
    pub fn stop_ids(&self) -> &BTreeSet<u32> {
        &self.stop_ids
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether the model ships a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Whether the model's chat template renders tools itself (otherwise
    /// [`tools::hermes_fallback`] rewrites a conversation that has them).
    pub fn template_knows_tools(&self) -> bool {
        self.chat_template
            .as_deref()
            .is_some_and(tools::template_knows_tools)
    }

    /// Renders `messages` with the model's chat template, the way
    /// transformers' `apply_chat_template` does (trim_blocks, lstrip_blocks,
    /// Python string methods, `raise_exception`, `tojson` as Python writes
    /// JSON).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.apply_chat_template_with_tools(messages, &[], add_generation_prompt)
    }

    /// [`Self::apply_chat_template`] with the functions the model may call:
    /// passed to a template that knows tools as `tools`, or written into
    /// the conversation by [`tools::hermes_fallback`] for one that does not
    /// (as is a conversation that carries calls or their results).
    pub fn apply_chat_template_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[Tool],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            InferenceError::Template(
                "this model has no chat template; send a plain prompt instead".into(),
            )
        })?;
        tools::check_tools(tools)?;
        let uses_tools = !tools.is_empty()
            || messages
                .iter()
                .any(|m| m.role == "tool" || !m.tool_calls.is_empty());
        let (messages, tools) = if uses_tools && !tools::template_knows_tools(template) {
            (tools::hermes_fallback(messages, tools)?, Vec::new())
        } else {
            let tools = tools
                .iter()
                .map(Tool::openai_json)
                .collect::<Result<Vec<_>>>()?;
            (messages.to_vec(), tools)
        };
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |format: String| {
            // Templates use it for "today's date" in system prompts.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            strftime_utc(now, &format)
        });
        // minijinja's own `tojson` escapes `<`, `>`, `&` and `'` for HTML
        // and writes no spaces; templates were written for Python's.
        env.add_filter(
            "tojson",
            |value: minijinja::Value,
             kwargs: minijinja::value::Kwargs|
             -> std::result::Result<minijinja::Value, minijinja::Error> {
                let indent: Option<usize> = kwargs.get("indent")?;
                kwargs.assert_all_used()?;
                let json = serde_json::to_value(&value).map_err(|e| {
                    minijinja::Error::new(minijinja::ErrorKind::BadSerialization, e.to_string())
                })?;
                Ok(minijinja::Value::from_safe_string(tools::python_json(
                    &json, indent,
                )))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| InferenceError::Template(format!("cannot parse: {e}")))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| InferenceError::Template(e.to_string()))?;
        let messages = tools::template_messages(&messages);
        let rendered = if tools.is_empty() {
            tmpl.render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.clone().unwrap_or_default(),
                eos_token => self.eos_token.clone().unwrap_or_default(),
            })
        } else {
            tmpl.render(minijinja::context! {
                messages => messages,
                tools => tools,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.clone().unwrap_or_default(),
                eos_token => self.eos_token.clone().unwrap_or_default(),
            })
        };
        rendered.map_err(|e| InferenceError::Template(format!("cannot render: {e}")))
    }
}

/// Enough of `strftime` for chat templates: %d %m %Y %b %B, in UTC.
fn strftime_utc(secs: u64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let name = MONTHS[(month - 1) as usize];
    format
        .replace("%d", &format!("{day:02}"))
        .replace("%m", &format!("{month:02}"))
        .replace("%Y", &year.to_string())
        .replace("%B", name)
        .replace("%b", &name[..3])
}

/// GPT-2's byte-level alphabet reversed: the character each byte is
/// written as in a byte-level vocabulary, back to the byte.
fn gpt2_unicode_to_byte() -> &'static std::collections::HashMap<char, u8> {
    static TABLE: std::sync::OnceLock<std::collections::HashMap<char, u8>> =
        std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u8| matches!(b, 33..=126 | 161..=172 | 174..=255);
        let mut next = 256u32;
        (0..=255u8)
            .map(|b| {
                let c = if printable(b) {
                    char::from(b)
                } else {
                    let c = char::from_u32(next).unwrap_or('\u{FFFD}');
                    next += 1;
                    c
                };
                (c, b)
            })
            .collect()
    })
}

/// Turns generated ids into text pieces as they arrive, holding back bytes
/// of a character that is not complete yet.
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Adds one id; returns the new text it completes, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            if let Some(delta) = full.get(prefix.len()..) {
                let delta = delta.to_string();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                return Ok(Some(delta));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_byte_alphabet_round_trips_every_byte() {
        let t = gpt2_unicode_to_byte();
        assert_eq!(t.len(), 256);
        assert_eq!(t.get(&'Ġ'), Some(&b' '));
        assert_eq!(t.get(&'Ċ'), Some(&b'\n'));
        assert_eq!(t.get(&'a'), Some(&b'a'));
    }

    #[test]
    fn strftime_formats_a_known_date() {
        // 2024-02-29T12:00:00Z
        assert_eq!(strftime_utc(1_709_208_000, "%d %b %Y"), "29 Feb 2024");
        assert_eq!(strftime_utc(0, "%Y-%m-%d %B"), "1970-01-01 January");
    }
}
