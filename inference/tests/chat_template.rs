//! Conversations with tools, rendered by silk's chat-template renderer
//! (minijinja) and compared byte for byte with what transformers renders
//! (jinja2), recorded by `scripts/chat_templates/record.py` from
//! `fixtures/templates/tools-conversation.json`.
//!
//! - Qwen3's own template knows tools: it gets them as transformers passes
//!   them, `tojson` must write JSON as Python does (spaces after `,` and
//!   `:`, no HTML escaping, non-ASCII kept), and calls' arguments are
//!   objects.
//! - SmolLM2's template knows none: the conversation is rewritten into the
//!   Hermes format first, which through a plain ChatML template must come
//!   out exactly as Qwen3's template writes it (same preamble, same call
//!   and result blocks).

use std::path::{Path, PathBuf};

use serde_json::Value;
use silk_inference::{ChatMessage, Tokenizer, Tool};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The tiny Qwen3 vocabulary with `template` as its chat template.
fn tokenizer(template: &str) -> (Tokenizer, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::copy(
        fixtures().join("tiny-qwen3/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .expect("copy tokenizer");
    let config = serde_json::json!({
        "chat_template": template,
        "eos_token": "<|im_end|>",
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string())
        .expect("write config");
    (Tokenizer::from_hf_dir(dir.path()).expect("tokenizer"), dir)
}

fn template(name: &str) -> String {
    std::fs::read_to_string(fixtures().join("templates").join(name)).expect("template")
}

fn expected(name: &str) -> String {
    std::fs::read_to_string(fixtures().join(format!("templates/{name}.expected.txt")))
        .expect("recording")
}

fn conversation() -> (Vec<ChatMessage>, Vec<Tool>) {
    let case: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("templates/tools-conversation.json"))
            .expect("conversation"),
    )
    .expect("JSON");
    let messages = serde_json::from_value(case["messages"].clone()).expect("messages");
    let tools = case["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .map(|t| Tool {
            name: t["name"].as_str().expect("name").to_string(),
            description: t["description"].as_str().map(str::to_string),
            parameters: match &t["parameters"] {
                Value::Null => String::new(),
                p => p.to_string(),
            },
        })
        .collect();
    (messages, tools)
}

/// Where two renderings first differ, for a readable failure.
fn assert_same(got: &str, want: &str, case: &str) {
    if got != want {
        let at = got
            .char_indices()
            .zip(want.chars())
            .find(|((_, a), b)| a != b)
            .map_or(got.len().min(want.len()), |((i, _), _)| i);
        let from = at.saturating_sub(80);
        panic!(
            "{case}: renderings differ at byte {at}\n got: {:?}\nwant: {:?}",
            &got[from..(at + 80).min(got.len())],
            &want[from..(at + 80).min(want.len())]
        );
    }
}

#[test]
fn qwen3s_template_renders_tools_and_calls_as_transformers_does() {
    let (tok, _dir) = tokenizer(&template("qwen3.jinja"));
    assert!(tok.template_knows_tools());
    let (messages, tools) = conversation();
    let got = tok
        .apply_chat_template_with_tools(&messages, &tools, true)
        .expect("render");
    assert_same(&got, &expected("qwen3-tools"), "qwen3-tools");
    let got = tok
        .apply_chat_template_with_tools(&messages[1..], &tools, true)
        .expect("render");
    assert_same(
        &got,
        &expected("qwen3-tools-no-system"),
        "qwen3-tools-no-system",
    );
    let got = tok
        .apply_chat_template_with_tools(&messages, &[], true)
        .expect("render");
    assert_same(&got, &expected("qwen3-history-only"), "qwen3-history-only");
}

#[test]
fn a_template_without_tools_gets_the_hermes_format_qwen3_writes() {
    let (tok, _dir) = tokenizer(&template("smollm2.jinja"));
    assert!(!tok.template_knows_tools());
    let (messages, tools) = conversation();
    let got = tok
        .apply_chat_template_with_tools(&messages, &tools, true)
        .expect("render");
    assert_same(&got, &expected("qwen3-tools"), "smollm2 fallback");
    // Without a system message the preamble is the system message.
    let got = tok
        .apply_chat_template_with_tools(&messages[1..], &tools, true)
        .expect("render");
    assert_same(
        &got,
        &expected("qwen3-tools-no-system"),
        "smollm2 fallback, no system message",
    );
}

#[test]
fn bad_tools_are_refused_naming_the_field() {
    let (tok, _dir) = tokenizer(&template("qwen3.jinja"));
    let messages = vec![ChatMessage::new("user", "hi")];
    let tool = |name: &str, parameters: &str| Tool {
        name: name.into(),
        description: None,
        parameters: parameters.into(),
    };
    for (tools, says) in [
        (vec![tool("a b", "")], "must be 1 to 64 letters"),
        (vec![tool("f", "{"), tool("g", "")], "are not JSON"),
        (vec![tool("f", "[1]")], "must be a JSON schema object"),
        (vec![tool("f", ""), tool("f", "")], "twice"),
    ] {
        let e = tok
            .apply_chat_template_with_tools(&messages, &tools, true)
            .expect_err(says);
        let text = e.to_string();
        assert!(text.contains("`tools`") && text.contains(says), "{text}");
    }
}
