"""What one request may ask of the server: a body-size limit (413 before the body is read, or
once a chunked body passes it), a cap on completions per request (400), and prompts tokenized off
the event loop, so a huge prompt never stalls the other clients."""

from __future__ import annotations

import threading

import httpx

from vibee.server.state import ServerLimits

from .fake_engine import FakeEngine


def test_a_body_over_the_limit_is_a_413_declared_or_chunked(make_server):
    srv = make_server(limits=ServerLimits(max_request_bytes=1000))
    big = {"prompt": "x" * 2000, "max_tokens": 1}
    r = httpx.post(srv.url + "/v1/completions", json=big)
    assert r.status_code == 413 and "larger than this server takes (1000 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"y" * 100
        yield b'", "max_tokens": 1}'

    r = httpx.post(srv.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error", r.text
    ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "x" * 100, "max_tokens": 1})
    assert ok.status_code == 200


def test_more_completions_than_a_request_may_ask_is_a_400(make_server):
    srv = make_server(limits=ServerLimits(max_choices=8))
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": ["a", "b", "c"], "n": 3, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert "asks for 9 completions (3 prompts x n 3); the server takes at most 8" in r.json()["error"]["message"]
    chat = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "n": 9})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "n"
    assert httpx.post(srv.url + "/v1/completions", json={"prompt": ["a", "b"], "n": 4, "max_tokens": 1}).status_code == 200


class _HeldTokenizer:
    """A tokenizer that holds one prompt until released (as a huge prompt holds a tokenizer)."""

    def __init__(self, inner):
        self.inner, self.holding, self.release = inner, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, text, add_special_tokens=True):
        if text.startswith("HELD"):
            self.holding.set()
            self.release.wait(30)
        return self.inner.encode(text, add_special_tokens=add_special_tokens)


def test_a_prompt_being_tokenized_does_not_hold_up_other_clients(make_server):
    engine = FakeEngine()
    tokenizer = engine.tokenizer = _HeldTokenizer(engine.tokenizer)
    srv = make_server(engine)
    held = threading.Thread(target=httpx.post, args=(srv.url + "/v1/completions",),
                            kwargs={"json": {"prompt": "HELD prompt", "max_tokens": 1}, "timeout": 60})
    held.start()
    try:
        assert tokenizer.holding.wait(10)
        # On the event loop, the tokenizer would hold these until released: they would time out.
        health = httpx.get(srv.url + "/health", timeout=5)
        quick = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=5)
        assert health.status_code == 200 and quick.status_code == 200
    finally:
        tokenizer.release.set()
        held.join()


class _CountingTokenizer:
    """The fake tokenizer, recording the length of every text it is asked to encode."""

    def __init__(self, inner):
        self.inner, self.lengths = inner, []

    def encode(self, text, add_special_tokens=True):
        self.lengths.append(len(text))
        return self.inner.encode(text, add_special_tokens)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_prompt_whose_head_is_too_long_is_refused_unread(make_server):
    """Megabytes of prompt are not tokenized whole: the head (64 characters a token of context)
    already has more tokens than the context, so the 400 comes from it."""
    from vibee.server.state import HEAD_CHARS_PER_TOKEN

    engine = FakeEngine(max_model_len=64)
    tokenizer = engine.tokenizer = _CountingTokenizer(engine.tokenizer)
    srv = make_server(engine)
    head = 64 * HEAD_CHARS_PER_TOKEN
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x" * 1_000_000, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert f"first {head} characters alone" in r.json()["error"]["message"]
    assert tokenizer.lengths == [head]
    chat = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "y" * 500_000}]})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    assert max(tokenizer.lengths) == head
    # A prompt within the head is tokenized once, whole, as before.
    ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 1})
    assert ok.status_code == 200 and tokenizer.lengths[-1] == 5
