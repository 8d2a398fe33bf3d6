"""The engine behind asyncio: one background thread runs LLMEngine.step in a loop; requests and
aborts reach it through a queue, and outputs go back to each request's asyncio queue.

A thread rather than an asyncio task: a step is a long synchronous torch call, and the event
loop must keep serving HTTP (health checks, new requests, disconnects) while it runs.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any, AsyncIterator

from vibee.runtime.config import EngineConfig
from vibee.runtime.engine import LLMEngine
from vibee.runtime.outputs import RequestOutput
from vibee.runtime.sampling_params import SamplingParams

log = logging.getLogger("vibee.engine")


class EngineClosed(Exception):
    """The engine is shutting down and takes no new requests."""


class EngineDead(Exception):
    """A step failed; the requests in flight were failed with this error."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._accepting = True
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="vibee-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig, *, progress: bool = True) -> "AsyncEngine":
        return cls(LLMEngine(config, progress=progress))

    # --- what the server reads ----------------------------------------------------------------

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_config(self):
        return self.engine.model_config

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    @property
    def served_model_name(self) -> str:
        return self.engine.config.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def info(self) -> dict[str, Any]:
        return self.engine.info()

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def add_observer(self, observer: Any) -> None:
        self.engine.add_observer(observer)

    def check_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.engine.check_prompt(prompt_token_ids, params)

    # --- requests -----------------------------------------------------------------------------

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as it runs. Leaving the loop early (the client went away)
        aborts the request and frees its KV blocks."""
        if not self._accepting:
            raise EngineClosed("the server is shutting down")
        self.engine.check_prompt(prompt_token_ids, params)
        stream: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._inbox.put(("add", request_id, list(prompt_token_ids), params, time.monotonic()))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._inbox.put(("abort", request_id))
                self._wake.set()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let those in flight finish for up to `timeout` seconds, abort the
        rest, and stop the engine thread."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self._streams or self.engine.has_unfinished()):
            await asyncio.sleep(0.02)
        self._inbox.put(("abort_all",))
        self._stopping = True
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)

    # --- the engine thread --------------------------------------------------------------------

    def _deliver(self, request_id: str, item: Any) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is None:
            return
        loop, stream = target
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:  # that event loop is closed: nobody is listening
            pass

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs, handed to each listening event loop in one call: waking a loop
        costs a write to its self-pipe, once per step rather than once per request."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        with self._lock:
            for out in outputs:
                target = self._streams.get(out.request_id)
                if target is not None:
                    batches.setdefault(target[0], []).append((target[1], out))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass

    def _handle_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                _, request_id, prompt, params, arrival = msg
                with self._lock:
                    listening = request_id in self._streams
                if not listening:
                    continue  # the client left before its request reached the engine
                try:
                    self.engine.add_request(request_id, prompt, params, arrival)
                except ValueError as exc:
                    self._deliver(request_id, exc)
            elif msg[0] == "abort":
                final = self.engine.abort_request(msg[1])
                if final is not None:
                    self._deliver(msg[1], final)
            elif msg[0] == "abort_all":
                for request_id in self.engine.request_ids():
                    final = self.engine.abort_request(request_id)
                    if final is not None:
                        self._deliver(request_id, final)

    def _loop(self) -> None:
        while True:
            self._handle_inbox()
            if self._stopping and not self.engine.has_unfinished():
                return
            if not self.engine.has_unfinished():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bug or an out-of-memory: fail what is in flight, keep serving
                log.exception("engine step failed; failing the requests in flight")
                error = EngineDead(f"the engine failed while running this request: {exc}")
                for request_id in self.engine.request_ids():
                    self.engine.abort_request(request_id)
                    self._deliver(request_id, error)
                continue
            self._deliver_step(outputs)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for stream, item in items:
        stream.put_nowait(item)
