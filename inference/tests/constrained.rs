//! Constrained decoding on models with random weights: whatever the model
//! would say, every answer parses and is valid against the request's JSON
//! schema. The tiny Llama and Qwen3 fixtures (random weights, real
//! byte-level vocabularies) sample at temperature 1 with 100 seeds each,
//! batched, so most tokens the model prefers are ones the mask removes.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use silk_inference::backend::Cpu;
use silk_inference::cpu::CpuKernels;
use silk_inference::engine::{Engine, EngineConfig, Event, FinishReason, GenerateRequest, Prompt};
use silk_inference::model::{LoadedModel, ModelSource};
use silk_inference::sampling::SamplingParams;
use silk_inference::tools::{read_tool_calls, ParsedCall, MAX_PARALLEL_TOOL_CALLS};
use silk_inference::transformer::WeightLayout;
use silk_inference::{Constraint, InferenceError, Tool};

fn engine(name: &str) -> Engine {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let source = ModelSource::from_path(&dir).expect("source");
    let model = LoadedModel::<Cpu>::load_on(
        source,
        WeightLayout::Dense,
        CpuKernels::best(),
        &Default::default(),
    )
    .expect("load");
    Engine::start(
        model,
        EngineConfig {
            max_batch: 32,
            max_queue: 128,
            ..Default::default()
        },
    )
    .expect("engine")
}

/// Every kind of bound a schema can put on a value, each small enough
/// that a complete answer fits in `MAX_TOKENS` (the fixtures' context is
/// 256) even one byte a token and every character of `name` escaped.
fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "colour": {"enum": ["red", "green", "blue"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
            "nested": {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}},
                "required": ["ok"],
                "additionalProperties": false
            }
        },
        "required": ["name", "colour", "age", "flags", "nested"],
        "additionalProperties": false
    })
}

const MAX_TOKENS: usize = 220;

/// Checks `v` against [`schema`] by hand, naming what is wrong.
fn valid(v: &Value) -> Result<(), String> {
    let o = v.as_object().ok_or("not an object")?;
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort_unstable();
    if keys != ["age", "colour", "flags", "name", "nested"] {
        return Err(format!("keys {keys:?}"));
    }
    let name = o["name"].as_str().ok_or("name is not a string")?;
    if name.chars().count() > 12 {
        return Err(format!("name {name:?} is longer than 12"));
    }
    if !matches!(o["colour"].as_str(), Some("red" | "green" | "blue")) {
        return Err(format!("colour {}", o["colour"]));
    }
    if o["age"].as_u64().is_none_or(|a| a > 120) {
        return Err(format!("age {}", o["age"]));
    }
    let flags = o["flags"].as_array().ok_or("flags is not an array")?;
    if flags.len() > 3 || !flags.iter().all(Value::is_boolean) {
        return Err(format!("flags {flags:?}"));
    }
    let nested = o["nested"].as_object().ok_or("nested is not an object")?;
    if nested.len() != 1 || !nested["ok"].is_boolean() {
        return Err(format!("nested {nested:?}"));
    }
    Ok(())
}

/// Runs `constraint` with seeds `0..seeds` at temperature 1, all submitted
/// at once; returns each answer's text, how it ended and its length in
/// tokens.
fn run(engine: &Engine, constraint: &Constraint, seeds: u64) -> Vec<(String, FinishReason, usize)> {
    let streams: Vec<_> = (0..seeds)
        .map(|seed| {
            let mut r = GenerateRequest::new(Prompt::Text("Describe a person:".into()), MAX_TOKENS);
            r.sampling = SamplingParams {
                temperature: 1.0,
                seed: Some(seed),
                ..Default::default()
            };
            r.constraint = Some(constraint.clone());
            engine.submit(r).expect("submit")
        })
        .collect();
    streams
        .into_iter()
        .map(|mut s| {
            let mut text = String::new();
            loop {
                match s.blocking_next() {
                    Some(Event::Token { text: t, .. }) => text.push_str(&t),
                    Some(Event::Done(u)) => return (text, u.finish_reason, u.completion_tokens),
                    Some(Event::Error(e)) => panic!("engine error: {e}"),
                    Some(Event::PromptLogprobs(_)) => {
                        panic!("prompt log-probabilities nobody asked for")
                    }
                    None => panic!("the stream ended without a result"),
                }
            }
        })
        .collect()
}

#[test]
fn every_answer_is_valid_against_its_schema_whatever_the_weights() {
    for name in ["tiny-llama", "tiny-qwen3"] {
        let engine = engine(name);
        let constraint = Constraint::JsonSchema(schema().to_string());
        let answers = run(&engine, &constraint, 100);
        for (seed, (text, finish, _)) in answers.iter().enumerate() {
            assert_eq!(*finish, FinishReason::Stop, "{name} seed {seed}: {text:?}");
            let v: Value = serde_json::from_str(text)
                .unwrap_or_else(|e| panic!("{name} seed {seed}: {text:?} is not JSON: {e}"));
            if let Err(why) = valid(&v) {
                panic!("{name} seed {seed}: {text} breaks the schema: {why}");
            }
        }
        let distinct: std::collections::BTreeSet<&String> = answers.iter().map(|a| &a.0).collect();
        println!(
            "{name}: 100 of 100 answers valid, {} distinct; e.g. {}",
            distinct.len(),
            answers[0].0
        );
        // Sampling still samples: the answers differ.
        assert!(
            distinct.len() > 10,
            "{name}: only {} distinct answers",
            distinct.len()
        );

        // Any JSON object: nothing bounds its keys and strings, so an
        // answer may run out of `max_tokens` (finish_reason `length`, as
        // with OpenAI); every answer that ended on its own is an object.
        let mut complete = 0;
        for (seed, (text, finish, tokens)) in
            run(&engine, &Constraint::JsonObject, 20).iter().enumerate()
        {
            if *finish == FinishReason::Length {
                assert_eq!(*tokens, MAX_TOKENS, "{name} seed {seed}");
                continue;
            }
            complete += 1;
            let v: Value = serde_json::from_str(text)
                .unwrap_or_else(|e| panic!("{name} json_object seed {seed}: {text:?}: {e}"));
            assert!(v.is_object(), "{name} seed {seed}: {text}");
        }
        println!("{name}: json_object, {complete} of 20 complete within {MAX_TOKENS} tokens, all objects");
    }
}

#[test]
fn a_schema_that_cannot_be_enforced_is_refused_naming_response_format() {
    let engine = engine("tiny-llama");
    for bad in [
        "not json".to_string(),
        "[1, 2]".to_string(),
        json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}).to_string(),
        json!({"type": "integer", "minimum": 5, "maximum": 1}).to_string(),
    ] {
        let mut r = GenerateRequest::new(Prompt::Text("x".into()), 8);
        r.constraint = Some(Constraint::JsonSchema(bad.clone()));
        match engine.submit(r) {
            Err(InferenceError::InvalidRequest { field, .. }) => {
                assert_eq!(field, "response_format", "{bad}")
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
}

/// The functions of the tool-call tests: the person schema above, one
/// whose schema refers to its own `$defs` (as pydantic writes them), and
/// one that takes no arguments.
fn tools() -> Vec<Tool> {
    vec![
        Tool {
            name: "save_person".into(),
            description: Some("Stores a person.".into()),
            parameters: schema().to_string(),
        },
        Tool {
            name: "paint".into(),
            description: None,
            parameters: json!({
                "type": "object",
                "properties": {"colour": {"$ref": "#/$defs/Colour"}},
                "required": ["colour"],
                "additionalProperties": false,
                "$defs": {"Colour": {"enum": ["red", "green", "blue"]}}
            })
            .to_string(),
        },
        Tool {
            name: "now".into(),
            description: None,
            parameters: String::new(),
        },
    ]
}

/// Checks a read call's arguments against its function's schema.
fn valid_call(call: &ParsedCall) -> Result<(), String> {
    let args: Value = serde_json::from_str(&call.arguments).map_err(|e| e.to_string())?;
    match call.name.as_str() {
        "save_person" => valid(&args),
        "paint"
            if matches!(args["colour"].as_str(), Some("red" | "green" | "blue"))
                && args.as_object().is_some_and(|o| o.len() == 1) =>
        {
            Ok(())
        }
        "now" if args.is_object() => Ok(()),
        other => Err(format!("{other}({args})")),
    }
}

/// `tool_choice: required`: whatever the weights, the answer is one call of
/// a declared function in the format the chat templates use, and its
/// arguments match that function's schema.
#[test]
fn every_required_tool_call_parses_and_matches_its_functions_schema() {
    let tools = tools();
    for name in ["tiny-llama", "tiny-qwen3"] {
        let engine = engine(name);
        let constraint = Constraint::ToolCalls {
            tools: tools.clone(),
            parallel: false,
        };
        let answers = run(&engine, &constraint, 100);
        let mut called = std::collections::BTreeMap::<String, usize>::new();
        for (seed, (text, finish, _)) in answers.iter().enumerate() {
            assert_eq!(*finish, FinishReason::Stop, "{name} seed {seed}: {text:?}");
            let (rest, calls) = read_tool_calls(text, &tools);
            assert_eq!(
                rest, None,
                "{name} seed {seed}: text outside the call in {text:?}"
            );
            assert_eq!(calls.len(), 1, "{name} seed {seed}: {text:?}");
            if let Err(why) = valid_call(&calls[0]) {
                panic!("{name} seed {seed}: {text} breaks the schema: {why}");
            }
            *called.entry(calls[0].name.clone()).or_default() += 1;
        }
        println!(
            "{name}: 100 of 100 required calls valid: {called:?}; e.g. {:?}",
            answers[0].0
        );

        // A named function: every answer calls it.
        let named = Constraint::ToolCalls {
            tools: vec![tools[1].clone()],
            parallel: false,
        };
        for (seed, (text, finish, _)) in run(&engine, &named, 20).iter().enumerate() {
            assert_eq!(*finish, FinishReason::Stop, "{name} seed {seed}");
            let (_, calls) = read_tool_calls(text, &tools);
            assert!(
                calls.len() == 1 && calls[0].name == "paint" && valid_call(&calls[0]).is_ok(),
                "{name} seed {seed}: {text:?}"
            );
        }

        // Parallel calls: up to the cap, each valid, in the answers that
        // ended by themselves.
        let parallel = Constraint::ToolCalls {
            tools: tools[1..].to_vec(),
            parallel: true,
        };
        let mut most = 0;
        for (seed, (text, finish, tokens)) in run(&engine, &parallel, 20).iter().enumerate() {
            if *finish == FinishReason::Length {
                assert_eq!(*tokens, MAX_TOKENS, "{name} seed {seed}");
                continue;
            }
            let (rest, calls) = read_tool_calls(text, &tools);
            assert_eq!(rest, None, "{name} seed {seed}: {text:?}");
            assert!(
                (1..=MAX_PARALLEL_TOOL_CALLS).contains(&calls.len()),
                "{name} seed {seed}: {} calls",
                calls.len()
            );
            for c in &calls {
                assert!(valid_call(c).is_ok(), "{name} seed {seed}: {c:?}");
            }
            most = most.max(calls.len());
        }
        println!("{name}: parallel calls, up to {most} in one answer");
    }
}

#[test]
fn a_tool_schema_that_cannot_be_enforced_is_refused_naming_tools() {
    let engine = engine("tiny-llama");
    for parameters in [
        "not json".to_string(),
        json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}).to_string(),
    ] {
        let mut r = GenerateRequest::new(Prompt::Text("x".into()), 8);
        r.constraint = Some(Constraint::ToolCalls {
            tools: vec![Tool {
                name: "f".into(),
                description: None,
                parameters: parameters.clone(),
            }],
            parallel: false,
        });
        match engine.submit(r) {
            Err(InferenceError::InvalidRequest { field, .. }) => {
                assert_eq!(field, "tools", "{parameters}")
            }
            other => panic!("{parameters}: {other:?}"),
        }
    }
}
