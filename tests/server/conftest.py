"""Server test fixtures: a FakeEngine app served by a real uvicorn on 127.0.0.1 (the openai client
needs real HTTP), started in a thread and stopped after the test."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest

from .fake_engine import FakeEngine
from .harness import serve


@pytest.fixture
def make_server():
    """make_server(engine=None, api_key=None, limits=None) -> SimpleNamespace(engine, app, url, client):
    `client` is an openai.OpenAI pointed at it (no retries, short timeout)."""
    import openai

    from vibee.server.app import create_app

    stack = contextlib.ExitStack()

    def make(engine: FakeEngine | None = None, api_key: str | None = None, limits=None) -> SimpleNamespace:
        engine = engine or FakeEngine()
        app = create_app(engine, api_key=api_key, limits=limits)
        url = stack.enter_context(serve(app))
        client = openai.OpenAI(base_url=url + "/v1", api_key=api_key or "unused", max_retries=0, timeout=10)
        stack.callback(client.close)
        return SimpleNamespace(engine=engine, app=app, url=url, client=client)

    with stack:
        yield make


@pytest.fixture
def srv(make_server):
    """A server around a default FakeEngine, no API key."""
    return make_server()
