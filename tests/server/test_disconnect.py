"""A client that goes away has its generation aborted (the engine's iterator is closed), whether
it was streaming or waiting for a whole response, and whether or not a token had come yet."""

from __future__ import annotations

import httpx
import pytest

from .fake_engine import FakeEngine
from .harness import wait_until

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
def slow(make_server):
    return make_server(FakeEngine(delay=0.02, max_model_len=100_000))


def test_stream_disconnect_aborts(slow):
    with httpx.Client(timeout=5) as client:
        with client.stream("POST", slow.url + "/v1/chat/completions",
                           json={"messages": CHAT, "max_tokens": 5000, "stream": True}) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any("content" in line for line in got)
        # leaving the block closes the connection mid-stream
    assert wait_until(lambda: len(slow.engine.aborted) == 1)
    assert not slow.engine.running and not slow.engine.finished


def test_non_streaming_disconnect_aborts(slow):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 5000}, timeout=0.3)
    assert wait_until(lambda: len(slow.engine.aborted) == 1)
    assert not slow.engine.running


def test_disconnect_before_first_token_aborts(make_server):
    s = make_server(FakeEngine(delay=2.0))
    for body in ({"prompt": "hi", "max_tokens": 5, "stream": True}, {"prompt": "hi", "max_tokens": 5}):
        n = len(s.engine.aborted)
        with pytest.raises(httpx.ReadTimeout):
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=0.3) as r:
                r.read()
        assert wait_until(lambda: len(s.engine.aborted) == n + 1), body
    assert not s.engine.running


def test_batch_stream_disconnect_aborts_every_prompt(slow):
    with httpx.stream("POST", slow.url + "/v1/completions",
                      json={"prompt": ["a", "b", "c"], "max_tokens": 5000, "stream": True}, timeout=5) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
    assert wait_until(lambda: len(slow.engine.aborted) == 3)
    assert sorted(rid[-2:] for rid in slow.engine.aborted) == ["-0", "-1", "-2"]
    assert not slow.engine.running


def test_finished_requests_are_not_aborted(make_server):
    s = make_server(FakeEngine(delay=0.001))
    httpx.post(s.url + "/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 5})
    with httpx.stream("POST", s.url + "/v1/chat/completions",
                      json={"messages": CHAT, "max_tokens": 5, "stream": True, "n": 2}) as r:
        r.read()
    assert wait_until(lambda: len(s.engine.finished) == 3)
    assert s.engine.aborted == [] and not s.engine.running


def test_aborts_show_in_metrics(slow):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 5000}, timeout=0.2)
    assert wait_until(lambda: 'finished_reason="abort"' in httpx.get(slow.url + "/metrics").text)
