#!/usr/bin/env python3
"""Records what a chat template renders for a conversation with tools, the
way transformers' `apply_chat_template` renders it (jinja2 with
trim_blocks, lstrip_blocks, loopcontrols, and a `tojson` that writes JSON as
Python's `json.dumps(ensure_ascii=False)` does), with each call's
arguments handed to the template as an object, as vLLM does.

silk's renderer (minijinja) is tested against these recordings in
`inference/tests/chat_template.rs`. Run it again after changing the
conversation:

    pip install jinja2
    python3 scripts/chat_templates/record.py
"""

import json
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox

FIXTURES = Path(__file__).resolve().parents[2] / "inference/tests/fixtures/templates"


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def render(template, messages, tools):
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages, tools=tools or None, add_generation_prompt=True, bos_token="", eos_token=""
    )


def openai_tool(t):
    function = {"name": t["name"]}
    if t.get("description") is not None:
        function["description"] = t["description"]
    function["parameters"] = t.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


def template_message(m):
    out = {"role": m["role"], "content": m["content"]}
    if m.get("tool_calls"):
        out["tool_calls"] = [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": json.loads(c["arguments"])},
            }
            for c in m["tool_calls"]
        ]
    if m.get("tool_call_id") is not None:
        out["tool_call_id"] = m["tool_call_id"]
    return out


def main():
    case = json.loads((FIXTURES / "tools-conversation.json").read_text())
    tools = [openai_tool(t) for t in case["tools"]]
    messages = [template_message(m) for m in case["messages"]]
    template = (FIXTURES / "qwen3.jinja").read_text()
    cases = {
        "qwen3-tools": (messages, tools),
        "qwen3-tools-no-system": (messages[1:], tools),
        "qwen3-history-only": (messages, []),
    }
    for name, (msgs, tls) in cases.items():
        (FIXTURES / f"{name}.expected.txt").write_text(render(template, msgs, tls))
        print(f"wrote {name}.expected.txt")


if __name__ == "__main__":
    main()
