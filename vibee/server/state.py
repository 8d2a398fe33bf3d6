"""What every route handler reads: the engine and the facts about the model it serves.

`create_app` builds one ServerState and keeps it on `app.state.server`; a handler declares a
parameter `state: State` and FastAPI hands it over (no closures over create_app's locals).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Annotated, Any, AsyncIterator, Awaitable, Protocol

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry

from vibee.server.errors import APIError, bad_request
from vibee.server.protocol import now


class EngineClient(Protocol):
    """What the server needs of an engine (vibee/runtime/async_engine.py's AsyncEngine, or a test's
    fake). Optional, read with fallbacks: `served_model_name`, `max_model_len`, `is_alive`,
    `model_config` (its `vocab_size` and `max_position_embeddings`). The app does not own the
    engine: whoever built it shuts it down."""

    tokenizer: Any
    config: Any

    def generate(self, prompt_token_ids: list[int], params: Any, request_id: str,
                 share_rank: int = 0) -> AsyncIterator[Any]: ...

    def check_prompt(self, prompt_token_ids: list[int], params: Any) -> None: ...

    def info(self) -> dict[str, Any] | Awaitable[dict[str, Any]]: ...

    def stats(self) -> dict[str, Any] | Awaitable[dict[str, Any]]: ...

    def add_observer(self, observer: Any) -> None: ...


# Characters of a prompt tokenized first, per token of context: real vocabularies' tokens span a
# few characters (at most 40 in the built-in model's), so a head this long that tokenizes to more
# than the context proves the prompt too long without tokenizing megabytes of it.
HEAD_CHARS_PER_TOKEN = 64


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of the server (`vibee serve` flags)."""

    max_request_bytes: int = 16 * 2**20  # a longer body is a 413 before it is read whole
    max_choices: int = 256  # completions per request: prompts x n


@dataclass
class ServerState:
    engine: EngineClient
    registry: CollectorRegistry  # this app's Prometheus metrics
    model_name: str
    limits: ServerLimits = field(default_factory=ServerLimits)
    created: int = field(default_factory=now)
    _token_text: dict[int, str] = field(default_factory=dict, repr=False)
    _fingerprint: str | None = field(default=None, repr=False)
    _structured: Any = field(default=None, repr=False)

    @classmethod
    def for_engine(cls, engine: EngineClient, limits: ServerLimits | None = None) -> "ServerState":
        return cls(engine, CollectorRegistry(), served_model_name(engine), limits or ServerLimits())

    async def encode(self, text: str, *, add_special_tokens: bool, param: str | None = None) -> list[int]:
        """The tokenizer's ids of `text`, computed off the event loop: a huge prompt must not stall
        the streams and health checks the loop serves meanwhile. With `param` (a prompt to
        generate from), a text whose head alone is longer than the context is a 400 before the
        rest is tokenized (HEAD_CHARS_PER_TOKEN characters per token of context)."""
        encode = self.engine.tokenizer.encode
        head = self.max_model_len * HEAD_CHARS_PER_TOKEN
        if param is not None and len(text) > head:
            # A prefix's pre-tokens are the whole text's but for the last: at most one fewer token.
            count = len(await asyncio.to_thread(encode, text[:head], add_special_tokens=add_special_tokens)) - 1
            if count > self.max_model_len:
                raise bad_request(f"This model's maximum context length is {self.max_model_len} tokens; the "
                                  f"prompt's first {head} characters alone are more than {count} tokens. "
                                  "Please reduce the prompt.", param=param)
        return await asyncio.to_thread(encode, text, add_special_tokens=add_special_tokens)

    def structured_outputs(self) -> Any:
        """The tokenizer's grammar compiler (vibee/runtime/structured_output.py), made on first use:
        requests' grammars are checked here, before the engine takes them."""
        if self._structured is None:
            from vibee.runtime.structured_output import StructuredOutputs

            tokenizer = self.engine.tokenizer
            eos = set(getattr(getattr(self.engine, "model_config", None), "eos_token_ids", None) or ())
            self._structured = StructuredOutputs(tokenizer, vocab_size=self.vocab_size,
                                                 eos_token_ids=eos | set(tokenizer.eos_token_ids),
                                                 table_bytes=0)  # checks grammars; the engine's decodes them
        return self._structured

    @property
    def system_fingerprint(self) -> str:
        """OpenAI's backend fingerprint: it changes when what answers does (model, precision, specs, flags)."""
        if self._fingerprint is None:
            config = getattr(self.engine, "config", None)
            described = config.model_dump_json() if hasattr(config, "model_dump_json") else repr(config)
            digest = hashlib.sha256(f"{self.model_name}\n{described}".encode()).hexdigest()
            self._fingerprint = f"fp_{digest[:10]}"
        return self._fingerprint

    @property
    def max_model_len(self) -> int:
        value = getattr(self.engine, "max_model_len", None)
        if isinstance(value, int):
            return value
        value = getattr(self.engine.config, "max_model_len", None)
        if isinstance(value, int):
            return value
        return int(self.engine.model_config.max_position_embeddings)

    @property
    def vocab_size(self) -> int:
        size = getattr(getattr(self.engine, "model_config", None), "vocab_size", None)
        return int(size) if size else int(self.engine.tokenizer.vocab_size)

    def is_alive(self) -> bool:
        alive = getattr(self.engine, "is_alive", None)
        if alive is None:
            return True
        return bool(alive() if callable(alive) else alive)

    async def ask(self, name: str) -> dict[str, Any]:
        """The engine's info() or stats(): a reply from the engine's process, or a plain value."""
        value = getattr(self.engine, name)()
        return await value if inspect.isawaitable(value) else value

    def token_text(self, token_id: int) -> str:
        """A token's text with special tokens spelled out (logprobs show every token)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.engine.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist. This server serves '{self.model_name}'.",
                           param="model", code="model_not_found")

    def check_tokens(self, ids: list[int], param: str) -> None:
        vocab = self.vocab_size
        for t in ids:
            if not 0 <= t < vocab:
                raise bad_request(f"Token id {t} is outside the vocabulary (0..{vocab - 1}).", param=param)


def served_model_name(engine: EngineClient) -> str:
    name = getattr(engine, "served_model_name", None)
    if isinstance(name, str) and name:
        return name
    config = engine.config
    return getattr(config, "served_model_name", None) or getattr(config, "model_name", None) or "vibee"


def _server_state(request: Request) -> ServerState:
    return request.app.state.server


# A handler's parameter `state: State` receives the app's ServerState.
State = Annotated[ServerState, Depends(_server_state)]
