"""Checks a silk node's OpenAI-compatible API with the official client.

Usage: check.py GATEWAY_URL WORKER_URL   — exits non-zero on any failure.
"""
import enum
import json
import sys
import typing
import urllib.request

import openai
import pydantic


def main(base: str, worker_url: str) -> None:
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused")

    models = client.models.list()
    ids = [m.id for m in models.data]
    assert len(ids) >= 1, f"no models on the mesh: {ids}"
    model = ids[0]
    print(f"models: {ids}")

    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": "What is 2 + 2?"}],
        max_tokens=16,
        temperature=0,
    )
    worker = raw.headers.get("x-silk-worker")
    attestation = raw.headers.get("x-silk-attestation")
    chat = raw.parse()
    text = chat.choices[0].message.content
    assert text, "empty chat answer"
    assert worker, "no x-silk-worker header"
    assert attestation in ("tdx", "insecure"), attestation
    assert chat.usage.completion_tokens >= 1, chat.usage
    extra = chat.model_extra or {}
    assert extra.get("silk", {}).get("worker") == worker, extra
    print(f"chat ({worker}, {attestation}): {text!r}")

    pieces = []
    stream = client.chat.completions.create(
        model=model.split("@")[0],  # by name
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=12,
        temperature=0,
        stream=True,
    )
    finish = None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces), "empty streamed answer"
    assert finish in ("stop", "length"), finish
    print(f"streamed chat: {''.join(pieces)!r} ({finish})")

    # Content as a list of parts, as LangChain and the Agents SDK send it;
    # with greedy decoding the answer equals the one to the same text sent
    # as a string (parts join with a newline).
    as_parts = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "Answer briefly."}]},
            {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "2 + 2?"}]},
        ],
        max_tokens=12,
        temperature=0,
    )
    as_string = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is\n2 + 2?"},
        ],
        max_tokens=12,
        temperature=0,
    )
    parts_text = as_parts.choices[0].message.content
    assert parts_text, "empty answer to content parts"
    assert parts_text == as_string.choices[0].message.content, (parts_text, as_string.choices[0].message.content)
    print(f"content parts: {parts_text!r}")
    try:
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
            ]}],
            max_tokens=4,
        )
    except openai.BadRequestError as e:
        err = (e.body or {}).get("error", e.body or {})
        assert "image_url" in err.get("message", ""), err
        print(f"image part refused: {err.get('message')}")
    else:
        raise AssertionError("an image part was accepted by a text-only model")

    comp = client.completions.create(model=model, prompt="The sky is", max_tokens=8, temperature=0)
    assert comp.choices[0].text, "empty completion"
    assert comp.usage.prompt_tokens >= 1
    print(f"completion: {comp.choices[0].text!r}")

    try:
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            temperature=5,
        )
    except openai.BadRequestError as e:
        body = e.body or {}
        err = body.get("error", body)
        assert e.status_code == 400, e.status_code
        assert "message" in err and "type" in err, body
        print(f"invalid request refused: {e.status_code} {err.get('message')}")
    else:
        raise AssertionError("temperature=5 was accepted")

    # Log-probabilities, from the logits the worker's sampler used: with
    # greedy decoding each chosen token is the most likely alternative, and
    # the tokens' bytes spell the answer.
    lp_chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=10,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = lp_chat.choices[0].logprobs.content
    answer = lp_chat.choices[0].message.content
    assert content and len(content) <= lp_chat.usage.completion_tokens, (content, lp_chat.usage)
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3, e
        assert e.top_logprobs[0].token == e.token, e
        assert abs(e.top_logprobs[0].logprob - e.logprob) < 1e-5, e
        assert sum(2.718281828 ** t.logprob for t in e.top_logprobs) <= 1.0001, e
    spelled = b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="ignore")
    assert answer.startswith(spelled) or spelled.startswith(answer), (spelled, answer)
    print(f"chat logprobs: {[(e.token, round(e.logprob, 3)) for e in content]}")
    streamed_tokens = []
    for chunk in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=10,
        temperature=0,
        logprobs=True,
        stream=True,
    ):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed_tokens += [e.token for e in chunk.choices[0].logprobs.content]
    assert streamed_tokens == [e.token for e in content], (streamed_tokens, content)
    lp_text = client.completions.create(
        model=model, prompt="The sky is", max_tokens=6, temperature=0, logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lps = lp_text.choices[0].logprobs
    assert len(lps.tokens) == 6 and len(lps.token_logprobs) == 6, lps
    assert all(len(t) <= 2 for t in lps.top_logprobs), lps
    assert lps.text_offset[0] == 0 and lps.text_offset == sorted(lps.text_offset), lps
    print(f"completion logprobs: {list(zip(lps.tokens, lps.token_logprobs))}")

    # Scoring a prompt (`echo` with `max_tokens: 0`, what evaluation
    # harnesses send): the prompt comes back with each token's
    # log-probability given the ones before it; the first has none.
    prompt = "The capital of France is Paris"
    scored = client.completions.create(
        model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=2, temperature=0
    )
    s = scored.choices[0]
    assert s.text == prompt, s.text
    assert "".join(s.logprobs.tokens) == prompt, s.logprobs.tokens
    assert s.logprobs.token_logprobs[0] is None, s.logprobs
    assert all(lp <= 0 for lp in s.logprobs.token_logprobs[1:]), s.logprobs
    assert s.logprobs.text_offset[0] == 0 and s.logprobs.text_offset == sorted(s.logprobs.text_offset)
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == len(s.logprobs.tokens)
    print(f"echo, max_tokens 0: {list(zip(s.logprobs.tokens, s.logprobs.token_logprobs))}")
    # The greedy continuation of a prompt, scored, is the model's best guess
    # at each of its tokens.
    went_on = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=3, echo=True, logprobs=1,
        temperature=0,
    ).choices[0]
    assert went_on.text.startswith("The capital of France is") and len(went_on.text) > len(prompt) - 6
    assert len(went_on.logprobs.tokens) == len(went_on.logprobs.token_logprobs)
    print(f"echo with an answer: {went_on.text!r}")
    chunks = list(client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=3, echo=True, logprobs=1,
        temperature=0, stream=True,
    ))
    streamed_text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed_text == went_on.text, (streamed_text, went_on.text)
    first = chunks[0].choices[0]
    assert first.text == "The capital of France is" and first.logprobs.token_logprobs[0] is None, first
    print("echo streamed: the prompt first, with its scores, then the same answer")

    # Structured outputs: the worker masks every step to the schema, so
    # even a 135M model's answer parses into the Pydantic model.
    class Colour(str, enum.Enum):
        red = "red"
        green = "green"
        blue = "blue"

    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=20)
        country: str = pydantic.Field(max_length=20)
        population_millions: int = pydantic.Field(ge=0, le=100)
        colour: Colour

    parsed = client.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City,
        max_tokens=200,
        temperature=0,
    )
    city = parsed.choices[0].message.parsed
    assert isinstance(city, City), parsed
    assert parsed.choices[0].finish_reason == "stop", parsed.choices[0]
    print(f"parse() with a Pydantic model: {city!r}")
    as_object = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Give me a JSON object about cats."}],
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=0.8,
        seed=1,
    )
    obj = json.loads(as_object.choices[0].message.content)
    assert isinstance(obj, dict), obj
    print(f"json_object: {as_object.choices[0].message.content!r}")
    try:
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {
                "name": "bad", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}},
        )
    except openai.BadRequestError as e:
        err = (e.body or {}).get("error", e.body or {})
        assert "response_format" in err.get("message", "") and err.get("param") == "response_format", err
        print(f"unsatisfiable schema refused: {err.get('message')[:120]}")
    else:
        raise AssertionError("an unsatisfiable schema was accepted")

    # Tools. With tool_choice "required" (or a named function) the worker
    # writes the call under a grammar made from the function's schema, so
    # even a 135M model's call parses into the Pydantic model.
    class GetWeather(pydantic.BaseModel):
        """The current weather in a city."""

        city: str = pydantic.Field(max_length=30)
        unit: typing.Literal["celsius", "fahrenheit"]

    weather_tool = openai.pydantic_function_tool(GetWeather, name="get_weather")
    clock_tool = {"type": "function", "function": {
        "name": "now", "description": "The time.", "strict": True,
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}}
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    called = client.chat.completions.parse(
        model=model, messages=ask, tools=[weather_tool, clock_tool],
        tool_choice="required", max_tokens=120, temperature=0,
    )
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None, choice.message
    calls = choice.message.tool_calls
    assert calls and all(c.id.startswith("call_") for c in calls), calls
    assert calls[0].function.name in ("get_weather", "now"), calls
    if calls[0].function.name == "get_weather":
        assert isinstance(calls[0].function.parsed_arguments, GetWeather), calls[0]
    print(f"tool_choice required: {[(c.function.name, c.function.arguments) for c in calls]}")
    # A named function, streamed: the call arrives as a tool_calls delta.
    stream = client.chat.completions.create(
        model=model, messages=ask, tools=[weather_tool, clock_tool],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=120, temperature=0, stream=True,
    )
    deltas, finish, content = [], None, ""
    for chunk in stream:
        for c in chunk.choices:
            deltas.extend(c.delta.tool_calls or [])
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and content == "", (finish, content)
    assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].function.name == "get_weather", deltas
    streamed = GetWeather.model_validate_json(deltas[0].function.arguments)
    print(f"streamed named call: get_weather({streamed!r})")
    # The conversation goes on: the assistant's calls and the results go
    # back as the SDK hands them over, and the model answers in text.
    followup = ask + [choice.message] + [
        {"role": "tool", "tool_call_id": c.id, "content": json.dumps({"temperature": 9, "sky": "rain"})}
        for c in calls
    ]
    answer = client.chat.completions.create(
        model=model, messages=followup, tools=[weather_tool, clock_tool], tool_choice="none",
        max_tokens=40, temperature=0,
    )
    reply = answer.choices[0]
    assert reply.message.tool_calls is None and reply.message.content, reply
    assert reply.finish_reason in ("stop", "length"), reply
    print(f"after the tool result: {reply.message.content!r}")
    # auto: the model decides; whatever it wrote is either text or calls of
    # declared functions.
    auto = client.chat.completions.create(
        model=model, messages=ask, tools=[weather_tool, clock_tool], max_tokens=60, temperature=0,
    ).choices[0]
    assert auto.finish_reason in ("stop", "length", "tool_calls"), auto
    assert (auto.finish_reason == "tool_calls") == bool(auto.message.tool_calls), auto
    print(f"tool_choice auto: finish {auto.finish_reason}, {auto.message.content or auto.message.tool_calls!r}")
    try:
        client.chat.completions.create(
            model=model, messages=ask, tools=[clock_tool], max_tokens=4,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
    except openai.BadRequestError as e:
        err = (e.body or {}).get("error", e.body or {})
        assert err.get("param") == "tool_choice", err
        print(f"a tool_choice naming an undeclared function refused: {err.get('message')}")
    else:
        raise AssertionError("a tool_choice naming an undeclared function was accepted")

    # Sampling past temperature, applied by the worker's engine. A bias of
    # +100 on one token makes every greedy step pick it: the answer is one
    # piece of text four times over.
    biased = client.completions.create(
        model=model, prompt="The sky is", max_tokens=4, temperature=0, logit_bias={"1000": 100}
    )
    text = biased.choices[0].text
    assert biased.usage.completion_tokens == 4, biased.usage
    assert text and len(text) % 4 == 0 and text == text[: len(text) // 4] * 4, repr(text)
    print(f"logit_bias +100 on token 1000: {text!r}")
    # A strong frequency penalty changes a greedy, repetitive answer.
    ask = dict(
        model=model,
        messages=[{"role": "user", "content": "Repeat after me: la la la la la la la la"}],
        max_tokens=24,
        temperature=0,
    )
    plain = client.chat.completions.create(**ask).choices[0].message.content
    penalised = client.chat.completions.create(**ask, frequency_penalty=2.0).choices[0].message.content
    assert plain != penalised, (plain, penalised)
    print(f"frequency_penalty 2: {plain!r} became {penalised!r}")

    # The error matrix: each invalid field gets a 400 naming it as `param`.
    for field, value in [
        ("temperature", 5),
        ("top_p", 0),
        ("presence_penalty", 3),
        ("frequency_penalty", -3),
        ("repetition_penalty", 0),
        ("min_p", 2),
        ("logit_bias", {"5": 101}),
        ("logit_bias", {"five": 1}),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("max_tokens", 0),
        ("n", 9),
        ("top_logprobs", 21),
    ]:
        try:
            client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "hi"}],
                **({"max_tokens": 4} if field != "max_tokens" else {}),
                extra_body={field: value, **({"logprobs": True} if field == "top_logprobs" else {})},
            )
        except openai.BadRequestError as e:
            err = (e.body or {}).get("error", e.body or {})
            assert e.status_code == 400, (field, e.status_code)
            assert err.get("param") == field, (field, err)
        else:
            raise AssertionError(f"{field}={value!r} was accepted")
    # A token id past the vocabulary is the worker's to judge: still 400.
    try:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            logit_bias={"99999999": 1},
        )
    except openai.BadRequestError as e:
        err = (e.body or {}).get("error", e.body or {})
        assert "logit_bias" in err.get("message", "") and err.get("param") == "logit_bias", err
        print(f"logit_bias past the vocabulary refused: {err.get('message')}")
    else:
        raise AssertionError("a logit_bias past the vocabulary was accepted")
    print("error matrix: every invalid field refused with its param")

    # The prefix cache: a long system prompt sent twice; the second time
    # the worker reads its whole prefill chunks (256 tokens each) from its
    # cache, and usage says how many.
    system = ("You are a careful assistant for a travel agency. Answer briefly, name "
              "sources when you can, and never invent prices. ") * 14
    turns = []
    for question in ["Where is Lisbon?", "Where is Porto?"]:
        r = client.chat.completions.create(
            model=model, max_tokens=4, temperature=0,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        )
        details = r.usage.prompt_tokens_details
        turns.append((r.usage.prompt_tokens, details.cached_tokens if details else None))
    (p1, c1), (p2, c2) = turns
    assert c1 is not None and c2 is not None, turns
    assert c1 == 0 and c2 >= 256 and c2 < p2, f"the shared system prompt came from the cache: {turns}"
    print(f"prompt_tokens_details.cached_tokens: {c1} of {p1}, then {c2} of {p2}")

    # n choices: one prompt, three answers with their own seeds (11, 12,
    # 13). The worker reads the prompt once; the later choices fork from
    # the first one's prefill, which its status counts as cached tokens.
    def cached_on_worker() -> int:
        with urllib.request.urlopen(worker_url + "/v1/status") as r:
            return json.load(r)["engine"]["cached_prompt_tokens"]

    before = cached_on_worker()
    ask = [{"role": "user", "content": "Write one word about the sea."}]
    multi = client.chat.completions.create(
        model=model, messages=ask, n=3, seed=11, temperature=1.0, max_tokens=32,
        logprobs=True, extra_body={"ignore_eos": True},
    )
    assert [c.index for c in multi.choices] == [0, 1, 2], multi.choices
    produced = sum(len(c.logprobs.content) for c in multi.choices)
    assert produced == multi.usage.completion_tokens == 96, (produced, multi.usage)
    shared = cached_on_worker() - before
    assert shared >= 2 * multi.usage.prompt_tokens, (
        f"two choices should have read the {multi.usage.prompt_tokens}-token prompt "
        f"from the first; the worker counted {shared} cached tokens"
    )
    texts = [c.message.content for c in multi.choices]
    assert len(set(texts)) > 1, f"three seeds drew one answer: {texts}"
    print(f"n=3: {[t[:24] for t in texts]}, {shared} prompt tokens shared on the worker")

    streamed = {}
    finishes = {}
    usage = None
    for chunk in client.chat.completions.create(
        model=model, messages=ask, n=2, seed=11, temperature=1.0, max_tokens=8, stream=True,
    ):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
        usage = chunk.usage or usage
    assert sorted(streamed) == [0, 1] and sorted(finishes) == [0, 1], (streamed, finishes)
    assert usage is not None and usage.completion_tokens <= 16, usage
    print(f"n=2 streamed: {streamed}, {finishes}")

    print("openai client checks passed")


if __name__ == "__main__":
    main(sys.argv[1].rstrip("/"), sys.argv[2].rstrip("/"))
