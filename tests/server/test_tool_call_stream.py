"""Streamed tool calls (vibee/server/tool_calls.py CallStream): as a constrained output grows, each
call's id, type and name come once its name is whole, then its arguments' JSON text piece by
piece; the pieces join to the arguments, whatever sizes the output grew by."""

from __future__ import annotations

import json

import pytest

from vibee.server.tool_calls import CLOSE, OPEN, CallStream, ToolPlan

WEATHER = '{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", "unit": "c", "n": [1, {"a": 2}]}}'
TIME = '{"name": "get_time", "arguments": {"zone": "UTC"}}'


def plan(fmt: str, choice: str = "required") -> ToolPlan:
    return ToolPlan(tools=[], choice=choice, format=fmt, parallel=True, grammar="start: x")


def streamed(stream: CallStream, text: str, step: int) -> tuple[list[dict], list[dict]]:
    """(the deltas, the calls they add up to) when text arrives `step` characters at a time."""
    deltas = []
    for end in range(step, len(text) + step, step):
        deltas += stream.deltas(text[:end])
    calls: dict[int, dict] = {}
    for d in deltas:
        if "id" in d:
            assert d["index"] not in calls and d["type"] == "function" and d["function"]["name"]
            calls[d["index"]] = {"name": d["function"]["name"], "arguments": ""}
        else:
            assert d["index"] in calls and "name" not in d["function"]
        calls[d["index"]]["arguments"] += d["function"]["arguments"]
    return deltas, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_hermes_calls_stream_their_arguments(step):
    text = OPEN + WEATHER + CLOSE + "\n" + OPEN + TIME + CLOSE
    deltas, calls = streamed(CallStream(plan("hermes")), text, step)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", json.loads(WEATHER)["arguments"]), ("get_time", {"zone": "UTC"})]
    if step == 1:  # a character at a time: the arguments come in many pieces, none past the call's end
        assert len(deltas) > 20 and calls[0]["arguments"] == json.dumps(json.loads(WEATHER)["arguments"])


def test_llama_call_streams_its_parameters():
    text = '{"name": "f", "parameters": {"x": [1, 2]}}'
    _, calls = streamed(CallStream(plan("llama")), text, 2)
    assert calls == [{"name": "f", "arguments": '{"x": [1, 2]}'}]


def test_a_name_is_sent_only_when_whole():
    stream = CallStream(plan("hermes"))
    assert stream.deltas(OPEN + '{"name": "get_wea') == []
    [first] = stream.deltas(OPEN + '{"name": "get_weather", "arguments": {"ci')
    assert first["function"] == {"name": "get_weather", "arguments": '{"ci'}


def test_text_that_is_not_a_call_streams_nothing():
    stream = CallStream(plan("hermes"))
    assert stream.deltas("def parse(") == [] and stream.broken


def test_auto_tells_calls_from_text_by_their_opening():
    auto = plan("hermes", "auto")
    assert auto.is_call("  <tool_call>\n{") and not auto.is_call("<tool") and not auto.is_call("Hello")
    assert plan("hermes").is_call("") and not plan("hermes", "none").is_call("<tool_call>")
