"""The engine as the server sees it: LLMEngine runs in a process of its own (engine_core.py) and
this client, in the server's process, sends it requests and aborts and hands each step's news to
the request's OutputStream on its event loop.

A reader thread blocks on the pipe, so the event loop never waits for the engine and the engine
never waits for the event loop. Observers (the Prometheus metrics) are called on that thread.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import threading
import time
from typing import Any, AsyncIterator, Callable

from vibee.runtime.config import EngineConfig
from vibee.runtime.engine_core import EngineFacts, run_engine_core
from vibee.runtime.output_stream import OutputStream
from vibee.runtime.outputs import RequestOutput
from vibee.runtime.requests import check_request
from vibee.runtime.sampling_params import SamplingParams

log = logging.getLogger("vibee.engine")
STOP_WAIT_S = 10.0  # how long shutdown waits for the engine process before killing it


class EngineClosed(Exception):
    """The engine is shutting down and takes no new requests."""


class EngineDead(Exception):
    """A step failed, or the engine process exited; the requests in flight failed with this."""


class EngineStartError(Exception):
    """The engine could not start because of a user's mistake; the message is ready to print."""


class AsyncEngine:
    def __init__(self, process: Any, conn: Any, facts: EngineFacts):
        self._process = process
        self._conn = conn
        self.facts = facts
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, OutputStream]] = {}
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._call_ids = itertools.count()
        self._lock = threading.Lock()  # _streams and _calls: the loops add, the reader thread reads
        self._send_lock = threading.Lock()
        self._observers: list[Any] = []
        self._accepting = True
        self._stopping = False
        self.dead: str | None = None  # why the engine process is gone
        self.on_death: Callable[[str], None] | None = None  # called (reader thread) if it dies unasked
        self._reader = threading.Thread(target=self._read, name="vibee-engine-reader", daemon=True)
        self._reader.start()

    @classmethod
    def from_config(cls, config: EngineConfig, *, progress: bool = True) -> "AsyncEngine":
        """Start the engine process and wait until its model is loaded (EngineStartError for a
        user's mistake, RuntimeError with the engine's traceback for anything else)."""
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: CUDA cannot follow a fork
        ours, theirs = ctx.Pipe()
        process = ctx.Process(target=run_engine_core, args=(config, theirs, progress), name="vibee-engine",
                              daemon=True)
        process.start()
        theirs.close()
        try:
            msg = ours.recv()
        except EOFError:
            process.join(STOP_WAIT_S)
            raise EngineStartError(f"error: the engine process exited while starting (exit code {process.exitcode})") from None
        if msg[0] == "failed":
            process.join(STOP_WAIT_S)
            if msg[2]:
                raise EngineStartError(msg[1])
            raise RuntimeError("the engine process failed to start:\n" + msg[1])
        return cls(process, ours, msg[1])

    # --- what the server reads ----------------------------------------------------------------

    @property
    def tokenizer(self):
        return self.facts.tokenizer

    @property
    def model_config(self):
        return self.facts.model_config

    @property
    def config(self) -> EngineConfig:
        return self.facts.config

    @property
    def served_model_name(self) -> str:
        return self.facts.served_model_name

    @property
    def max_model_len(self) -> int:
        return self.facts.max_model_len

    def is_alive(self) -> bool:
        return self.dead is None and not self._stopping and self._process.is_alive()

    async def info(self) -> dict[str, Any]:
        return await self._call("info")

    async def stats(self) -> dict[str, Any]:
        return await self._call("stats")

    def add_observer(self, observer: Any) -> None:
        self._observers.append(observer)

    def check_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        f = self.facts
        check_request(prompt_token_ids, params, vocab_size=f.vocab_size, max_model_len=f.max_model_len,
                      kv_tokens=f.kv_tokens)

    # --- requests -----------------------------------------------------------------------------

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str, share_rank: int = 0) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as it runs (each with everything new since the last one).
        Leaving the loop early (the client went away) aborts the request and frees its KV blocks.
        share_rank: its first choice's place in a client request of several prompts (LLMEngine.add_request)."""
        if not self._accepting:
            raise EngineClosed("the server is shutting down")
        if self.dead is not None:
            raise EngineDead(self.dead)
        self.check_prompt(prompt_token_ids, params)
        prompt = list(prompt_token_ids)
        stream = OutputStream(request_id, prompt, params.n, params.logprobs is not None)
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = (asyncio.get_running_loop(), stream)
        finished = False
        try:
            self._send(("add", request_id, prompt, params, time.monotonic(), share_rank))
            while not finished:
                out = await stream.next()
                finished = out.finished
                yield out
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished and stream.error is None:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        try:
            self._send(("abort", request_id))
        except EngineDead:
            pass  # nothing left to abort

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let those in flight finish for up to `timeout` seconds, abort the
        rest, and stop the engine process."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._streams and self.dead is None:
            await asyncio.sleep(0.02)
        self._stopping = True
        try:
            self._send(("abort_all",))
            self._send(("shutdown",))
        except EngineDead:
            pass
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._process.join, STOP_WAIT_S)
        if self._process.is_alive():
            log.warning("the engine process did not stop in %.0f s; terminating it", STOP_WAIT_S)
            self._process.terminate()
            await loop.run_in_executor(None, self._process.join, STOP_WAIT_S)
        await loop.run_in_executor(None, self._reader.join, STOP_WAIT_S)
        self._conn.close()

    # --- the pipe -----------------------------------------------------------------------------

    def _send(self, msg: tuple) -> None:
        if self.dead is not None:
            raise EngineDead(self.dead)
        try:
            with self._send_lock:
                self._conn.send(msg)
        except (OSError, ValueError):  # a broken or closed pipe: the reader thread reports why
            raise EngineDead(self.dead or "the engine process is gone") from None

    async def _call(self, name: str) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        call_id = next(self._call_ids)
        with self._lock:
            self._calls[call_id] = (loop, future)
        try:
            self._send(("call", call_id, name))
            return await future
        finally:
            with self._lock:
                self._calls.pop(call_id, None)

    def _read(self) -> None:
        """The reader thread: every message from the engine, until its process ends."""
        try:
            while True:
                self._dispatch(self._conn.recv())
        except (EOFError, OSError):
            pass
        self._ended()

    def _dispatch(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "step":
            _, deltas, steps, finished = msg
            for observer in self._observers:
                for stats in steps:
                    observer.on_step(stats)
                for stats in finished:
                    observer.on_request_finished(stats)
            batches: dict[asyncio.AbstractEventLoop, list[tuple[OutputStream, tuple]]] = {}
            with self._lock:
                for delta in deltas:
                    target = self._streams.get(delta[0])
                    if target is not None:
                        batches.setdefault(target[0], []).append((target[1], delta))
            for loop, items in batches.items():
                _soon(loop, _add_all, items)  # one wake-up of each loop per step
        elif kind == "refused":
            self._fail([msg[1]], ValueError(msg[2]))
        elif kind == "step_failed":
            self._fail(msg[1], EngineDead(msg[2]))
        elif kind == "reply":
            with self._lock:
                target = self._calls.get(msg[1])
            if target is not None:
                _soon(target[0], _resolve, target[1], msg[2], None)

    def _fail(self, request_ids: list[str], error: BaseException) -> None:
        with self._lock:
            targets = [self._streams[r] for r in request_ids if r in self._streams]
        for loop, stream in targets:
            _soon(loop, stream.fail, error)

    def _ended(self) -> None:
        """The engine process is gone: asked to (shutdown) or not (a crash, a kill)."""
        asked = self._stopping  # read first: a shutdown that starts after the crash must not hide it
        self._process.join(STOP_WAIT_S)
        reason = f"the engine process exited (exit code {self._process.exitcode})"
        self.dead = reason
        if not asked:  # told before the requests fail, so whoever watches knows why they did
            log.error("%s; the requests in flight failed", reason)
            if self.on_death is not None:
                self.on_death(reason)
        with self._lock:
            streams = list(self._streams)
            calls = list(self._calls.values())
        self._fail(streams, EngineDead(reason))
        for loop, future in calls:
            _soon(loop, _resolve, future, None, EngineDead(reason))


def _soon(loop: asyncio.AbstractEventLoop, fn: Callable, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that event loop is closed: nobody is listening
        pass


def _add_all(items: list[tuple[OutputStream, tuple]]) -> None:
    for stream, (_, finished, num_cached, changes, prompt_logprobs) in items:
        stream.add(finished, num_cached, changes, prompt_logprobs)


def _resolve(future: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
