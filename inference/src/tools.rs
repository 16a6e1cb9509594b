//! Tool calling: the functions a request declares, how a conversation that
//! uses them reaches the model, and how the model's answer is read back
//! into calls.
//!
//! silk speaks one tool-call format, the Hermes format Qwen's templates use:
//! the model writes `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`
//! (one block per call) and reads results back as `<tool_response>` blocks.
//!
//! - A chat template that knows tools (it reads `tools` and
//!   `tool_calls`, as Qwen3's does) gets them as transformers passes them:
//!   `tools` in OpenAI's shape, each assistant message's `tool_calls` with
//!   their arguments as objects.
//! - A template that does not (SmolLM2's, Llama's) gets the conversation
//!   rewritten first ([`hermes_fallback`]): the tool list goes into the
//!   system message in the words Qwen's template uses, assistant calls
//!   become `<tool_call>` text and tool results become a user turn of
//!   `<tool_response>` blocks. The model's own template then renders that.
//! - [`ToolCallReader`] reads the answer as it streams: text outside the
//!   blocks stays text, a block whose JSON names a declared function
//!   becomes a [`ParsedCall`], anything else in a block stays text.
//!
//! With `tool_choice` `required` or a named function the worker enforces
//! the format with a grammar ([`crate::Constraint::ToolCalls`]), so the
//! arguments always match the function's schema.

use std::collections::HashSet;

use serde_json::Value;

use crate::error::{InferenceError, Result};
use crate::tokenizer::ChatMessage;

/// A function the model may call (OpenAI's `tools[].function`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tool {
    /// 1 to 64 letters, digits, `_` or `-`.
    pub name: String,
    /// What it does, for the model.
    pub description: Option<String>,
    /// Its arguments' JSON schema, as JSON text; empty when it takes none.
    pub parameters: String,
}

/// A call an assistant made, as a conversation carries it back.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ToolCall {
    /// The id the caller's `tool` message answers with `tool_call_id`.
    pub id: String,
    /// The function.
    pub name: String,
    /// Its arguments as JSON text.
    pub arguments: String,
}

/// Most tools a request declares (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;
/// Most calls one answer makes under a `required` grammar with parallel
/// calls allowed.
pub const MAX_PARALLEL_TOOL_CALLS: usize = 8;
/// Most bytes of all tools' names, descriptions and schemas together.
pub const MAX_TOOLS_BYTES: usize = 64 * 1024;

/// Opens a call in the model's answer.
pub const TOOL_CALL_OPEN: &str = "<tool_call>";
/// Closes it.
pub const TOOL_CALL_CLOSE: &str = "</tool_call>";

fn invalid(reason: String) -> InferenceError {
    InferenceError::InvalidRequest {
        field: "tools",
        reason,
    }
}

/// Whether `name` is a valid function name (OpenAI's rule).
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Tool {
    /// The arguments' schema: `parameters` parsed, or an object with no
    /// properties when it is empty.
    pub fn schema(&self) -> Result<Value> {
        if self.parameters.trim().is_empty() {
            return Ok(serde_json::json!({ "type": "object", "properties": {} }));
        }
        let schema: Value = serde_json::from_str(&self.parameters).map_err(|e| {
            invalid(format!(
                "the parameters of `{}` are not JSON: {e}",
                self.name
            ))
        })?;
        if !schema.is_object() {
            return Err(invalid(format!(
                "the parameters of `{}` must be a JSON schema object",
                self.name
            )));
        }
        Ok(schema)
    }

    /// The tool as OpenAI's API and transformers' templates have it:
    /// `{"type": "function", "function": {name, description, parameters}}`.
    pub fn openai_json(&self) -> Result<Value> {
        let mut function = serde_json::Map::new();
        function.insert("name".into(), Value::String(self.name.clone()));
        if let Some(d) = &self.description {
            function.insert("description".into(), Value::String(d.clone()));
        }
        function.insert("parameters".into(), self.schema()?);
        Ok(serde_json::json!({ "type": "function", "function": function }))
    }

    fn bytes(&self) -> usize {
        self.name.len() + self.description.as_ref().map_or(0, String::len) + self.parameters.len()
    }
}

/// Checks a request's tools: how many, how big, names valid and distinct,
/// each schema a JSON object. The error names `tools`.
pub fn check_tools(tools: &[Tool]) -> Result<()> {
    if tools.len() > MAX_TOOLS {
        return Err(invalid(format!(
            "has {} functions, at most {MAX_TOOLS} are allowed",
            tools.len()
        )));
    }
    let bytes: usize = tools.iter().map(Tool::bytes).sum();
    if bytes > MAX_TOOLS_BYTES {
        return Err(invalid(format!(
            "are {bytes} bytes together, at most {MAX_TOOLS_BYTES} are allowed"
        )));
    }
    let mut names = HashSet::new();
    for tool in tools {
        if !valid_name(&tool.name) {
            return Err(invalid(format!(
                "function name {:?} must be 1 to 64 letters, digits, _ or -",
                tool.name
            )));
        }
        if !names.insert(tool.name.as_str()) {
            return Err(invalid(format!(
                "declares the function `{}` twice",
                tool.name
            )));
        }
        tool.schema()?;
    }
    Ok(())
}

/// Whether a chat template renders tools itself: it reads both the
/// `tools` list and messages' `tool_calls`.
pub fn template_knows_tools(template: &str) -> bool {
    template.contains("tools") && template.contains("tool_calls")
}

/// A call's arguments as a template gets them: the JSON object when the
/// text is one (what vLLM and transformers pass), else the text itself.
fn arguments_value(arguments: &str) -> Value {
    match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => v,
        _ => Value::String(arguments.to_string()),
    }
}

/// `messages` as a chat template receives them: `role` and `content`
/// always, `name`, `tool_calls` and `tool_call_id` where present.
pub(crate) fn template_messages(messages: &[ChatMessage]) -> Vec<Value> {
    messages
        .iter()
        .map(|m| {
            let mut o = serde_json::Map::new();
            o.insert("role".into(), Value::String(m.role.clone()));
            o.insert("content".into(), Value::String(m.content.clone()));
            if let Some(name) = &m.name {
                o.insert("name".into(), Value::String(name.clone()));
            }
            if !m.tool_calls.is_empty() {
                let calls = m
                    .tool_calls
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "id": c.id,
                            "type": "function",
                            "function": { "name": c.name, "arguments": arguments_value(&c.arguments) },
                        })
                    })
                    .collect();
                o.insert("tool_calls".into(), Value::Array(calls));
            }
            if let Some(id) = &m.tool_call_id {
                o.insert("tool_call_id".into(), Value::String(id.clone()));
            }
            Value::Object(o)
        })
        .collect()
}

/// What the fallback puts into the system message, in the words of Qwen's
/// own template (so a model tuned on either reads the same thing).
fn tools_preamble(tools: &[Tool]) -> Result<String> {
    let mut s = String::from(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
         You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    );
    for tool in tools {
        s.push('\n');
        s.push_str(&python_json(&tool.openai_json()?, None));
    }
    s.push_str(
        "\n</tools>\n\nFor each function call, return a json object with function name and \
         arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
         {\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
    );
    Ok(s)
}

/// One call as the model writes it.
fn call_text(call: &ToolCall) -> String {
    format!(
        "{TOOL_CALL_OPEN}\n{{\"name\": {}, \"arguments\": {}}}\n{TOOL_CALL_CLOSE}",
        python_json(&Value::String(call.name.clone()), None),
        python_json(&arguments_value(&call.arguments), None),
    )
}

/// The conversation rewritten for a template that knows no tools, in the
/// Hermes format: tools into the (first) system message, assistant calls
/// as `<tool_call>` text after the message's content, consecutive `tool`
/// messages as one user turn of `<tool_response>` blocks.
pub fn hermes_fallback(messages: &[ChatMessage], tools: &[Tool]) -> Result<Vec<ChatMessage>> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    let mut rest = messages;
    if !tools.is_empty() {
        let preamble = tools_preamble(tools)?;
        match messages.first() {
            Some(first) if first.role == "system" => {
                out.push(ChatMessage::new(
                    "system",
                    format!("{}\n\n{preamble}", first.content),
                ));
                rest = &messages[1..];
            }
            _ => out.push(ChatMessage::new("system", preamble)),
        }
    }
    // Whether the last message out is a turn of tool results.
    let mut results_turn = false;
    for m in rest {
        let is_tool = m.role == "tool";
        match m.role.as_str() {
            "assistant" if !m.tool_calls.is_empty() => {
                let mut text = m.content.clone();
                for call in &m.tool_calls {
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&call_text(call));
                }
                out.push(ChatMessage::new("assistant", text));
            }
            "tool" => {
                let block = format!("<tool_response>\n{}\n</tool_response>", m.content);
                match out.last_mut() {
                    Some(prev) if results_turn => {
                        prev.content.push('\n');
                        prev.content.push_str(&block);
                    }
                    _ => out.push(ChatMessage::new("user", block)),
                }
            }
            _ => out.push(ChatMessage {
                tool_calls: Vec::new(),
                tool_call_id: None,
                ..m.clone()
            }),
        }
        results_turn = is_tool;
    }
    Ok(out)
}

/// JSON text as Python's `json.dumps(value, ensure_ascii=False)` writes it,
/// which is what transformers' `tojson` filter gives a chat template:
/// `", "` between items and `": "` after keys, or with `indent` one item a
/// line. Keys keep their order.
pub fn python_json(value: &Value, indent: Option<usize>) -> String {
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let mut ser = serde_json::Serializer::with_formatter(
                &mut out,
                serde_json::ser::PrettyFormatter::with_indent(&pad),
            );
            serde::Serialize::serialize(value, &mut ser)
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
            serde::Serialize::serialize(value, &mut ser)
        }
    };
    // Serializing a `Value` into memory cannot fail.
    debug_assert!(written.is_ok());
    String::from_utf8(out).unwrap_or_default()
}

/// serde_json's compact output with Python's default separators.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// A call read from the model's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCall {
    /// A function the request declared.
    pub name: String,
    /// Its arguments as compact JSON text (an object).
    pub arguments: String,
}

/// A piece of the answer: text for the caller, or a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Text outside any call.
    Text(String),
    /// A call to a declared function.
    Call(ParsedCall),
}

/// Reads `<tool_call>` blocks out of an answer as its text arrives.
///
/// Text that could still become the start of a block is held back until
/// it is decided; so is whitespace, which is dropped where it only
/// separates calls from each other or from the text. An answer with no
/// call comes out exactly as it went in. A block whose JSON is not a call
/// of a declared function (`{"name": …, "arguments": {…}}`) comes out as
/// the text it was, as does a block the answer never closes.
#[derive(Debug, Clone)]
pub struct ToolCallReader {
    names: HashSet<String>,
    /// Text not yet decided.
    buf: String,
    /// Inside a block (its opening tag consumed).
    in_call: bool,
    /// Whitespace after the last text emitted, held until more text comes.
    pending_ws: String,
    /// The last piece was a call, so leading whitespace is dropped.
    after_call: bool,
    /// Calls read so far.
    calls: usize,
}

impl ToolCallReader {
    /// A reader that accepts calls of `tools`.
    pub fn new(tools: &[Tool]) -> Self {
        Self {
            names: tools.iter().map(|t| t.name.clone()).collect(),
            buf: String::new(),
            in_call: false,
            pending_ws: String::new(),
            after_call: false,
            calls: 0,
        }
    }

    /// How many calls it has read.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Takes the next text of the answer; returns what is decided.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            if self.in_call {
                let Some(end) = self.buf.find(TOOL_CALL_CLOSE) else {
                    break;
                };
                let body: String = self.buf.drain(..end + TOOL_CALL_CLOSE.len()).collect();
                let body = &body[..end];
                self.in_call = false;
                match self.parse(body) {
                    Some(call) => {
                        self.pending_ws.clear();
                        self.after_call = true;
                        self.calls += 1;
                        out.push(Piece::Call(call));
                    }
                    None => {
                        let text = format!("{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}");
                        self.text(&text, &mut out);
                    }
                }
            } else if let Some(start) = self.buf.find(TOOL_CALL_OPEN) {
                let before: String = self.buf.drain(..start).collect();
                self.buf.drain(..TOOL_CALL_OPEN.len());
                self.text(&before, &mut out);
                self.in_call = true;
            } else {
                // Hold back a tail that could be the start of a tag (the tag
                // is ASCII, so the cut is on a character boundary).
                let keep = (1..TOOL_CALL_OPEN.len())
                    .rev()
                    .find(|&k| self.buf.ends_with(&TOOL_CALL_OPEN[..k]))
                    .unwrap_or(0);
                let cut = self.buf.len() - keep;
                let decided: String = self.buf.drain(..cut).collect();
                self.text(&decided, &mut out);
                break;
            }
        }
        out
    }

    /// The answer has ended: whatever is held back, decided.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        if self.in_call {
            self.in_call = false;
            let text = format!("{TOOL_CALL_OPEN}{rest}");
            self.text(&text, &mut out);
        } else {
            self.text(&rest, &mut out);
        }
        if self.calls == 0 && !self.pending_ws.is_empty() {
            out.push(Piece::Text(std::mem::take(&mut self.pending_ws)));
        }
        out
    }

    fn text(&mut self, text: &str, out: &mut Vec<Piece>) {
        let text = if self.after_call {
            text.trim_start()
        } else {
            text
        };
        if text.is_empty() {
            return;
        }
        self.after_call = false;
        let body = text.trim_end();
        let ws = &text[body.len()..];
        if body.is_empty() {
            self.pending_ws.push_str(ws);
            return;
        }
        let mut s = std::mem::take(&mut self.pending_ws);
        s.push_str(body);
        out.push(Piece::Text(s));
        self.pending_ws = ws.to_string();
    }

    /// A block's JSON as a call of a declared function.
    fn parse(&self, body: &str) -> Option<ParsedCall> {
        let v: Value = serde_json::from_str(body.trim()).ok()?;
        let o = v.as_object()?;
        let name = o.get("name")?.as_str()?;
        if !self.names.contains(name) {
            return None;
        }
        let arguments = match o.get("arguments") {
            None => serde_json::Map::new(),
            Some(Value::Object(a)) => a.clone(),
            // Some models write the arguments as a JSON string.
            Some(Value::String(s)) => match serde_json::from_str::<Value>(s).ok()? {
                Value::Object(a) => a,
                _ => return None,
            },
            Some(_) => return None,
        };
        Some(ParsedCall {
            name: name.to_string(),
            arguments: Value::Object(arguments).to_string(),
        })
    }
}

/// A whole answer read at once: its text (`None` when only whitespace is
/// left) and its calls.
pub fn read_tool_calls(answer: &str, tools: &[Tool]) -> (Option<String>, Vec<ParsedCall>) {
    let mut reader = ToolCallReader::new(tools);
    let mut pieces = reader.push(answer);
    pieces.extend(reader.finish());
    let mut text = String::new();
    let mut calls = Vec::new();
    for p in pieces {
        match p {
            Piece::Text(t) => text.push_str(&t),
            Piece::Call(c) => calls.push(c),
        }
    }
    let text = if calls.is_empty() || !text.trim().is_empty() {
        Some(text)
    } else {
        None
    };
    (text, calls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tools() -> Vec<Tool> {
        ["get_weather", "now"]
            .iter()
            .map(|n| Tool {
                name: (*n).into(),
                description: None,
                parameters: String::new(),
            })
            .collect()
    }

    /// The answer fed in the given pieces, then finished.
    fn read_split(answer: &str, cuts: &[usize]) -> Vec<Piece> {
        let mut reader = ToolCallReader::new(&tools());
        let mut out = Vec::new();
        let mut from = 0;
        for &cut in cuts {
            let cut = cut.clamp(from, answer.len());
            if !answer.is_char_boundary(cut) {
                continue;
            }
            out.extend(reader.push(&answer[from..cut]));
            from = cut;
        }
        out.extend(reader.push(&answer[from..]));
        out.extend(reader.finish());
        out
    }

    /// Adjacent text pieces joined, so streams compare by what they say.
    fn joined(pieces: Vec<Piece>) -> Vec<Piece> {
        let mut out: Vec<Piece> = Vec::new();
        for p in pieces {
            match (out.last_mut(), p) {
                (Some(Piece::Text(a)), Piece::Text(b)) => a.push_str(&b),
                (_, p) => out.push(p),
            }
        }
        out
    }

    fn call(name: &str, arguments: &str) -> Piece {
        Piece::Call(ParsedCall {
            name: name.into(),
            arguments: arguments.into(),
        })
    }

    #[test]
    fn calls_are_read_out_of_text_and_whitespace_around_them_is_dropped() {
        let answer = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": \"{}\"}\n</tool_call>\n";
        let want = vec![
            Piece::Text("Let me check.".into()),
            call("get_weather", r#"{"city":"Zürich"}"#),
            call("now", "{}"),
        ];
        assert_eq!(joined(read_split(answer, &[])), want);
        let (text, calls) = read_tool_calls(answer, &tools());
        assert_eq!(text.as_deref(), Some("Let me check."));
        assert_eq!(calls.len(), 2);
        // Only calls: no text at all.
        let (text, calls) = read_tool_calls(
            "<tool_call>{\"name\":\"now\",\"arguments\":{}}</tool_call>",
            &tools(),
        );
        assert_eq!((text, calls.len()), (None, 1));
    }

    #[test]
    fn a_block_that_is_not_a_call_of_a_declared_function_stays_text() {
        for block in [
            "<tool_call>{\"name\": \"rm_rf\", \"arguments\": {}}</tool_call>",
            "<tool_call>{\"name\": \"now\", \"arguments\": [1]}</tool_call>",
            "<tool_call>{\"name\": \"now\", \"arguments\": \"[1]\"}</tool_call>",
            "<tool_call>not json</tool_call>",
            "<tool_call>{\"arguments\": {}}</tool_call>",
            "<tool_call>{\"name\": \"now\"",
        ] {
            let answer = format!("a {block} b");
            assert_eq!(
                joined(read_split(&answer, &[])),
                vec![Piece::Text(answer.clone())],
                "{block}"
            );
            let (text, calls) = read_tool_calls(&answer, &tools());
            assert_eq!((text.as_deref(), calls.len()), (Some(answer.as_str()), 0));
        }
        // A call without arguments takes none.
        assert_eq!(
            read_split("<tool_call>{\"name\": \"now\"}</tool_call>", &[]),
            vec![call("now", "{}")]
        );
    }

    #[test]
    fn python_json_writes_what_pythons_json_dumps_writes() {
        // json.dumps(v, ensure_ascii=False) and json.dumps(v, ensure_ascii=False, indent=2)
        let v: Value = serde_json::from_str(
            r#"{"b": [1, 2.5, "x<y & 'z'"], "a": {"é": null, "n": true}, "e": {}, "l": []}"#,
        )
        .expect("JSON");
        assert_eq!(
            python_json(&v, None),
            r#"{"b": [1, 2.5, "x<y & 'z'"], "a": {"é": null, "n": true}, "e": {}, "l": []}"#
        );
        assert_eq!(
            python_json(&v, Some(2)),
            "{\n  \"b\": [\n    1,\n    2.5,\n    \"x<y & 'z'\"\n  ],\n  \"a\": {\n    \"é\": null,\n    \"n\": true\n  },\n  \"e\": {},\n  \"l\": []\n}"
        );
    }

    proptest! {
        /// Text with no call comes out exactly as it went in, however the
        /// stream splits it (held-back tag prefixes and whitespace included).
        #[test]
        fn text_without_calls_streams_through_unchanged(
            answer in "[ a<\n_tolc/>é]{0,40}",
            cuts in proptest::collection::vec(0usize..48, 0..6),
        ) {
            prop_assume!(!answer.contains(TOOL_CALL_OPEN));
            let mut cuts = cuts;
            cuts.sort_unstable();
            let out: String = read_split(&answer, &cuts)
                .into_iter()
                .map(|p| match p {
                    Piece::Text(t) => t,
                    Piece::Call(c) => panic!("a call in {answer:?}: {c:?}"),
                })
                .collect();
            prop_assert_eq!(out, answer);
        }

        /// However an answer with calls is split into stream pieces, it
        /// reads the same as whole.
        #[test]
        fn every_split_reads_as_the_whole(
            cuts in proptest::collection::vec(0usize..200, 0..8),
            lead in "[ a\n<]{0,6}",
        ) {
            let answer = format!(
                "{lead}<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"Paris\"}}}}\n</tool_call> then <tool_call>{{\"name\": \"now\", \"arguments\": {{}}}}</tool_call>\n"
            );
            let mut cuts = cuts;
            cuts.sort_unstable();
            prop_assert_eq!(joined(read_split(&answer, &cuts)), joined(read_split(&answer, &[])));
        }
    }

    #[test]
    fn the_fallback_writes_tools_calls_and_results_in_the_hermes_format() {
        let tools = tools();
        let mut asked = ChatMessage::new("assistant", "");
        asked.tool_calls = vec![ToolCall {
            id: "c1".into(),
            name: "now".into(),
            arguments: "{}".into(),
        }];
        let mut answer = ChatMessage::new("tool", "12:00");
        answer.tool_call_id = Some("c1".into());
        let out = hermes_fallback(&[ChatMessage::new("user", "time?"), asked, answer], &tools)
            .expect("fallback");
        let roles: Vec<&str> = out.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert!(out[0].content.starts_with("# Tools\n"));
        assert!(out[0]
            .content
            .contains(r#"{"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}"#));
        assert_eq!(
            out[2].content,
            "<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>"
        );
        assert_eq!(out[3].content, "<tool_response>\n12:00\n</tool_response>");
        assert!(out
            .iter()
            .all(|m| m.tool_calls.is_empty() && m.tool_call_id.is_none()));
    }
}
