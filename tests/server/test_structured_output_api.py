"""Structured output and tools over HTTP on the real engine (the built-in model): OpenAI's
response_format and tools through the openai client, the exact calls langchain-openai makes for
with_structured_output and bind_tools, streams of tool calls, and the 400s of grammars, tools
and tool_choice that can't be used."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Literal

import httpx
import pytest
from pydantic import BaseModel, ConfigDict, Field

from .harness import serve

pytestmark = pytest.mark.slow


class City(BaseModel):
    """A city and its country."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=10)
    country: Literal["FR", "DE", "IT"]
    capital: bool


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def served():
    import openai

    from vibee.runtime.async_engine import AsyncEngine
    from vibee.runtime.config import EngineConfig
    from vibee.server.app import create_app

    engine = AsyncEngine.from_config(EngineConfig(device="cpu", cpu_kv_cache_gib=0.25, seed=0), progress=False)
    try:
        with serve(create_app(engine)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
            yield url, client, engine.served_model_name
            client.close()
    finally:
        asyncio.run(engine.shutdown(timeout=0.0))


def test_json_schema_and_json_object(served):
    url, client, model = served
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": City.model_json_schema(), "strict": True}}
    r = client.chat.completions.create(model=model, messages=ASK, response_format=fmt, max_tokens=60, n=3,
                                       temperature=1.0, seed=1)
    done = [c for c in r.choices if c.finish_reason == "stop"]
    assert done
    for c in done:
        City.model_validate_json(c.message.content)
    r = client.completions.create(model=model, prompt="data = ", max_tokens=40, temperature=0.0,
                                  extra_body={"response_format": {"type": "json_object"}})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].text), dict)
    assert r.choices[0].text.startswith("{")


def test_vibee_grammar_and_regex(served):
    url, _, _ = served
    grammar = 'start: "SELECT " COL ("," COL)? " FROM " TABLE\nCOL: "id" | "name"\nTABLE: /[a-z]{1,6}/'
    r = httpx.post(url + "/v1/completions", json={"prompt": "q = ", "max_tokens": 30, "n": 3, "temperature": 1.0,
                                                  "response_format": {"type": "grammar", "grammar": grammar}})
    assert r.status_code == 200
    for c in r.json()["choices"]:
        if c["finish_reason"] == "stop":
            assert re.fullmatch(r"SELECT (id|name)(,(id|name))? FROM [a-z]{1,6}", c["text"]), c["text"]
    r = httpx.post(url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 20,
                                                       "response_format": {"type": "regex", "regex": "[0-9]{4}-[0-9]{2}"}})
    assert re.fullmatch("[0-9]{4}-[0-9]{2}", r.json()["choices"][0]["message"]["content"])


def test_larks_json_grammar_runs_on_the_device(served):
    """Lark's own JSON grammar (lists and objects inside each other) over HTTP: compiled on the engine
    process's grammar thread to its pushdown automaton, masked on the device; the text is a prefix
    of the language, and a finished value parses under Lark."""
    import lark

    from tests.runtime.test_lark_pda_device import LARK_JSON
    from vibee.runtime.lark_rtn import lark_rtn

    url, _, _ = served
    stats = lambda: httpx.get(url + "/v1/inference/stats").json()["structured_output"]  # noqa: E731
    before = stats()
    r = httpx.post(url + "/v1/completions", json={"prompt": '[{"id": 1, "tags": ["a"]}, [2, 3]]\n', "max_tokens": 40,
                                                  "temperature": 0.0,
                                                  "response_format": {"type": "grammar", "grammar": LARK_JSON}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    rtn = lark_rtn(LARK_JSON)
    assert rtn.run(choice["text"]) is not None, choice["text"]
    if choice["finish_reason"] == "stop" or rtn.accepts(choice["text"]):
        lark.Lark(LARK_JSON).parse(choice["text"])
    after = stats()
    assert (after["device_requests"], after["host_requests"]) == (before["device_requests"] + 1, before["host_requests"])


@pytest.mark.parametrize("stream", [False, True])
def test_named_and_required_tool_calls(served, stream):
    """Tool plans whose argument schemas are regular run as token DFAs on the device: the calls
    come back whole within 60 tokens (forced text kept to its canonical tokens)."""
    url, client, model = served
    on_device = httpx.get(url + "/v1/inference/stats").json()["structured_output"]["device_requests"]
    for choice, names in [({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
                          ("required", {"get_weather", "get_time"})]:
        kw = dict(model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=60,
                  temperature=0.0, parallel_tool_calls=False)
        if stream:  # a call's id, type and name come once, then its arguments' text piece by piece
            calls, pieces, finish, content = {}, {}, None, ""
            for chunk in client.chat.completions.create(stream=True, **kw):
                delta = chunk.choices[0].delta
                content += delta.content or ""
                for call in delta.tool_calls or []:
                    if call.id is not None:
                        assert call.index not in calls and call.function.name and call.type == "function"
                        calls[call.index] = call
                    else:
                        assert call.index in calls and call.function.name is None
                    pieces.setdefault(call.index, []).append(call.function.arguments or "")
                finish = chunk.choices[0].finish_reason or finish
            for index, call in calls.items():
                call.function.arguments = "".join(pieces[index])
            calls = [calls[i] for i in sorted(calls)]
            assert content == ""
        else:
            r = client.chat.completions.create(**kw)
            calls, finish = r.choices[0].message.tool_calls, r.choices[0].finish_reason
            assert r.choices[0].message.content is None
        assert finish == "tool_calls" and len(calls) == 1
        assert calls[0].function.name in names and calls[0].id.startswith("call_")
        args = json.loads(calls[0].function.arguments)
        assert set(args) == ({"zone"} if calls[0].function.name == "get_time" else {"city", "unit"})
    assert httpx.get(url + "/v1/inference/stats").json()["structured_output"]["device_requests"] == on_device + 2


def test_auto_tools_answer_text_or_calls(served):
    """auto: the built-in code model writes text, which comes back as content (no call parsed out of it)."""
    _, client, model = served
    r = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], max_tokens=8, temperature=0.0)
    message = r.choices[0].message
    assert (message.content and not message.tool_calls) or (message.tool_calls and message.content is None)
    assert not (message.content or "").lstrip().startswith("<tool_call>")


def test_tool_results_go_back_into_the_prompt(served):
    _, client, model = served
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"c\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}]
    r = client.chat.completions.create(model=model, messages=history, tools=[WEATHER], tool_choice="none",
                                       max_tokens=5, temperature=0.0)
    assert r.choices[0].message.tool_calls in (None, [])


def test_langchain_structured_output_and_bind_tools(served):
    langchain_openai = pytest.importorskip("langchain_openai")
    url, _, model = served
    llm = langchain_openai.ChatOpenAI(base_url=url + "/v1", api_key="unused", model=model, temperature=0,
                                      max_tokens=60, max_retries=0)
    city = llm.with_structured_output(City, method="json_schema", strict=True).invoke("Name a city.")
    assert isinstance(city, City)
    via_tool = llm.with_structured_output(City, method="function_calling").invoke("Name a city.")
    assert isinstance(via_tool, City)

    def get_weather(city: str, unit: Literal["c", "f"]) -> str:
        """The weather in a city."""
        return "sunny"

    message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Paris?")
    assert [c["name"] for c in message.tool_calls] == ["get_weather"]
    assert set(message.tool_calls[0]["args"]) == {"city", "unit"}


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "grammar", "grammar": "start: missing_rule"}}, "response_format", "unknown name"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type", ""),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name", "name"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "Two tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "both"),
])
def test_unusable_requests_are_400s(served, body, param, words):
    url, _, _ = served
    r = httpx.post(url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and words in error["message"]
