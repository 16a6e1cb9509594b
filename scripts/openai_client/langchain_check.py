"""Checks that LangChain's `ChatOpenAI` works against a silk node: tools
bound with `bind_tools` (a forced call, then the tool's result back and a
text answer), `with_structured_output` with a Pydantic model (both through
`response_format` and through a forced function call), and streaming.

Usage: langchain_check.py http://127.0.0.1:PORT   — exits non-zero on any failure.
"""
import sys
import typing

import openai
import pydantic
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI


class City(pydantic.BaseModel):
    """A city."""

    name: str = pydantic.Field(max_length=20)
    country: str = pydantic.Field(max_length=20)
    population_millions: int = pydantic.Field(ge=0, le=100)


@tool
def get_weather(city: str, unit: typing.Literal["celsius", "fahrenheit"]) -> str:
    """The current weather in a city."""
    return f'{{"city": "{city}", "temperature": 9, "unit": "{unit}"}}'


def main(base: str) -> None:
    model = openai.OpenAI(base_url=base + "/v1", api_key="unused").models.list().data[0].id
    llm = ChatOpenAI(
        base_url=base + "/v1", api_key="unused", model=model, temperature=0, max_tokens=120
    )

    # A forced call through bind_tools, run, and its result sent back.
    with_tools = llm.bind_tools([get_weather], tool_choice="get_weather")
    question = HumanMessage("What is the weather in Oslo?")
    asked = with_tools.invoke([question])
    assert len(asked.tool_calls) == 1, asked
    call = asked.tool_calls[0]
    assert call["name"] == "get_weather" and isinstance(call["args"], dict), call
    assert call["args"].get("unit") in ("celsius", "fahrenheit") and call["args"].get("city"), call
    print(f"langchain: bind_tools forced call: {call['name']}({call['args']})")
    result = get_weather.invoke(call)
    assert isinstance(result, ToolMessage), result
    answer = llm.bind_tools([get_weather]).invoke([question, asked, result])
    assert answer.content or answer.tool_calls, answer
    print(f"langchain: after the tool result: {answer.content or answer.tool_calls!r}")

    # Streaming with tools: the chunks add up to the same call.
    gathered = None
    for chunk in with_tools.stream([question]):
        gathered = chunk if gathered is None else gathered + chunk
    assert gathered is not None and len(gathered.tool_calls) == 1, gathered
    assert gathered.tool_calls[0]["name"] == "get_weather", gathered.tool_calls
    print(f"langchain: streamed call: {gathered.tool_calls[0]['args']}")

    # Structured output, both ways LangChain asks for it.
    for method in ("json_schema", "function_calling"):
        city = llm.with_structured_output(City, method=method).invoke("Describe Paris.")
        assert isinstance(city, City), (method, city)
        print(f"langchain: with_structured_output({method}): {city!r}")

    print("langchain checks passed")


if __name__ == "__main__":
    main(sys.argv[1].rstrip("/"))
