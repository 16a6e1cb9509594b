// Checks a silk node's OpenAI-compatible API with the official `openai` npm
// package (Node 20): chat, streaming, content parts, logprobs, structured
// output with a Zod schema, a tool round trip (streamed too), and an error
// matrix.
//
// Usage: node check.mjs http://127.0.0.1:PORT   — exits non-zero on any failure.
import assert from "node:assert/strict";

import OpenAI from "openai";
import { zodFunction, zodResponseFormat } from "openai/helpers/zod";
import { z } from "zod";

const base = process.argv[2].replace(/\/$/, "");
const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: "unused" });

const models = await client.models.list();
const model = models.data[0]?.id;
assert.ok(model, "no models on the mesh");
console.log(`node: models: ${models.data.map((m) => m.id)}`);

// Chat, with content as a list of parts (as LangChain.js sends it).
const chat = await client.chat.completions.create({
  model,
  messages: [
    { role: "developer", content: [{ type: "text", text: "Answer briefly." }] },
    { role: "user", content: [{ type: "text", text: "What is 2 + 2?" }] },
  ],
  max_tokens: 16,
  temperature: 0,
  logprobs: true,
  top_logprobs: 2,
});
const answer = chat.choices[0];
assert.ok(answer.message.content, "empty chat answer");
assert.ok(chat.usage.completion_tokens >= 1, JSON.stringify(chat.usage));
const lps = answer.logprobs.content;
assert.equal(lps.length, chat.usage.completion_tokens - (answer.finish_reason === "stop" ? 1 : 0));
assert.ok(lps.every((t) => t.logprob <= 0 && t.top_logprobs.length === 2), JSON.stringify(lps[0]));
console.log(`node: chat with parts and logprobs: ${JSON.stringify(answer.message.content)}`);

// Streaming.
let streamed = "";
let finish = null;
for await (const chunk of await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: "Name a colour." }],
  max_tokens: 12,
  temperature: 0,
  stream: true,
})) {
  for (const c of chunk.choices) {
    streamed += c.delta.content ?? "";
    finish = c.finish_reason ?? finish;
  }
}
assert.ok(streamed && ["stop", "length"].includes(finish), `${streamed} ${finish}`);
console.log(`node: streamed: ${JSON.stringify(streamed)} (${finish})`);

// Structured output with a Zod schema: the worker enforces it.
const City = z.object({
  name: z.string().max(20),
  country: z.string().max(20),
  population_millions: z.number().int().min(0).max(100),
  colour: z.enum(["red", "green", "blue"]),
});
const parsed = await client.chat.completions.parse({
  model,
  messages: [{ role: "user", content: "Describe Paris as JSON." }],
  response_format: zodResponseFormat(City, "city"),
  max_tokens: 200,
  temperature: 0,
});
const city = parsed.choices[0].message.parsed;
assert.ok(city && City.safeParse(city).success, JSON.stringify(parsed.choices[0].message));
console.log(`node: parse() with a Zod schema: ${JSON.stringify(city)}`);

// Tools: a required call parses into the Zod schema, the result goes back,
// the model answers in text.
const GetWeather = z.object({
  city: z.string().max(30),
  unit: z.enum(["celsius", "fahrenheit"]),
});
const tools = [
  zodFunction({ name: "get_weather", parameters: GetWeather, description: "The weather in a city." }),
];
const ask = [{ role: "user", content: "What is the weather in Rome?" }];
const called = await client.chat.completions.parse({
  model,
  messages: ask,
  tools,
  tool_choice: "required",
  parallel_tool_calls: false,
  max_tokens: 120,
  temperature: 0,
});
const call = called.choices[0];
assert.equal(call.finish_reason, "tool_calls", JSON.stringify(call));
assert.equal(call.message.tool_calls.length, 1);
const toolCall = call.message.tool_calls[0];
assert.equal(toolCall.function.name, "get_weather");
assert.ok(GetWeather.safeParse(toolCall.function.parsed_arguments).success, JSON.stringify(toolCall));
console.log(`node: required call: get_weather(${toolCall.function.arguments})`);
const reply = await client.chat.completions.create({
  model,
  messages: [
    ...ask,
    call.message,
    { role: "tool", tool_call_id: toolCall.id, content: JSON.stringify({ temperature: 14, sky: "clear" }) },
  ],
  tools,
  max_tokens: 40,
  temperature: 0,
});
assert.ok(["stop", "length", "tool_calls"].includes(reply.choices[0].finish_reason));
console.log(`node: after the tool result: ${JSON.stringify(reply.choices[0].message.content ?? reply.choices[0].message.tool_calls)}`);

// Streaming with tools, through the SDK's own stream helper: the call
// arrives as a tool_calls delta and the final completion holds it parsed.
const runner = client.chat.completions.stream({
  model,
  messages: ask,
  tools,
  tool_choice: { type: "function", function: { name: "get_weather" } },
  max_tokens: 120,
  temperature: 0,
});
let deltas = 0;
runner.on("chunk", (chunk) => {
  deltas += chunk.choices.reduce((n, c) => n + (c.delta.tool_calls?.length ?? 0), 0);
});
const final = await runner.finalChatCompletion();
const streamedCall = final.choices[0].message.tool_calls[0];
assert.equal(deltas, 1);
assert.equal(final.choices[0].finish_reason, "tool_calls");
assert.ok(GetWeather.safeParse(streamedCall.function.parsed_arguments).success, JSON.stringify(streamedCall));
console.log(`node: streamed named call: get_weather(${streamedCall.function.arguments})`);

// The error matrix: each invalid field gets a 400 naming it as `param`.
const refusals = [
  ["temperature", { temperature: 5 }],
  ["top_p", { top_p: 0 }],
  ["n", { n: 9 }],
  ["top_logprobs", { logprobs: true, top_logprobs: 21 }],
  ["tool_choice", { tool_choice: "required" }],
  ["tool_choice", { tools, tool_choice: { type: "function", function: { name: "rm" } } }],
  ["tools", { tools: [...tools, ...tools] }],
  ["response_format", { response_format: { type: "json_schema", json_schema: { name: "bad name!" } } }],
];
for (const [param, fields] of refusals) {
  try {
    await client.chat.completions.create({
      model,
      messages: [{ role: "user", content: "hi" }],
      max_tokens: 4,
      ...fields,
    });
    assert.fail(`${JSON.stringify(fields)} was accepted`);
  } catch (e) {
    assert.ok(e instanceof OpenAI.BadRequestError, `${JSON.stringify(fields)}: ${e}`);
    assert.equal(e.status, 400);
    assert.equal(e.param, param, `${JSON.stringify(fields)}: ${e.message}`);
  }
}
console.log("node: error matrix: every invalid field refused with its param");
console.log("node openai client checks passed");
