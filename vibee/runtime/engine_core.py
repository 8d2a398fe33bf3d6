"""The engine's own process: LLMEngine.step in a loop, fed and read through one pipe.

The server's process (vibee/runtime/async_engine.py) parses HTTP, tokenizes prompts and writes
every stream; this process only schedules, runs the GPU and detokenizes. Two processes, two
GILs: streaming to hundreds of clients never delays a step (in one process it did: a 10 ms step
took 20 ms beside a busy event loop), and a step never delays a client.

Messages to the engine:   ("add", request_id, prompt_token_ids, params, arrival, share_rank)
                          ("abort", request_id) | ("abort_all",) | ("call", call_id, "info" | "stats")
                          ("shutdown",)  (finish what runs, then exit)
Messages from the engine: ("ready", EngineFacts) | ("failed", message, user_error) at startup
                          ("step", [OutputDelta], [StepStats], [RequestStats]) after each step
                          ("refused", request_id, message) | ("reply", call_id, value)
                          ("step_failed", [request_id], message)
Only what changed crosses the pipe (an OutputDelta per changed request), never a whole sequence.

A request whose grammar needs a token DFA not compiled yet waits for it off the loop: the DFA is
built on a thread of its own (up to a second at a 128k vocabulary) while the steps go on, and the
request is added once it is done; the other requests never wait for it.
"""

from __future__ import annotations

import logging
import signal
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from vibee.runtime.config import EngineConfig
from vibee.runtime.outputs import RequestOutput
from vibee.runtime.rank_group import RankLost
from vibee.runtime.token_dfa import NotRegular

log = logging.getLogger("vibee.engine")

IDLE_POLL_S = 0.5  # how long an idle engine waits for a message before checking again
COMPILE_POLL_S = 0.002  # how long an engine with nothing to step waits while a grammar compiles


@dataclass
class EngineFacts:
    """What the server's process needs to know once: the tokenizer, the limits a prompt is
    checked against before it is sent, and the startup summary."""

    tokenizer: Any
    model_config: Any
    config: EngineConfig
    served_model_name: str
    max_model_len: int
    vocab_size: int
    kv_tokens: int  # prompt + max_tokens must fit in this (the KV cache less its watermark)
    summary: list[str]


# (request_id, finished, num_cached_tokens, [(index, delta_text, delta_token_ids, delta_logprobs,
#  finish_reason, stop_reason)], prompt_logprobs): a RequestOutput's news, without the tokens sent
# before (prompt_logprobs: in the request's first delta only, when asked for).
OutputDelta = tuple[str, bool, int, list[tuple[int, str, list[int], Any, str | None, Any]], Any]


def delta_of(out: RequestOutput) -> OutputDelta:
    return (out.request_id, out.finished, out.num_cached_tokens,
            [(c.index, c.delta_text, c.delta_token_ids, c.delta_logprobs, c.finish_reason, c.stop_reason)
             for c in out.outputs], out.prompt_logprobs)


class _StatsBuffer:
    """An engine observer that keeps each step's figures until they go out with the step."""

    def __init__(self) -> None:
        self.steps: list[Any] = []
        self.requests: list[Any] = []

    def on_step(self, stats: Any) -> None:
        self.steps.append(stats)

    def on_request_finished(self, stats: Any) -> None:
        self.requests.append(stats)

    def take(self) -> tuple[list[Any], list[Any]]:
        steps, requests = self.steps, self.requests
        self.steps, self.requests = [], []
        return steps, requests


def _start(config: EngineConfig, conn: Connection, progress: bool):
    """Build the engine and send its facts; None (after sending why) when it cannot start."""
    from vibee.engine_flags import render_user_error
    from vibee.runtime.engine import LLMEngine
    from vibee.runtime.engine_report import startup_summary

    try:
        engine = LLMEngine(config, progress=progress)
    except Exception as exc:  # noqa: BLE001 - whatever it is, the server's process reports it
        user = render_user_error(exc)
        conn.send(("failed", user if user is not None else traceback.format_exc(), user is not None))
        return None
    # From now on Ctrl-C in a terminal (and a service manager's SIGTERM), which reach every
    # process of the group, are the server's to handle: it stops this process through the pipe
    # once the responses in flight are done. If the server is gone, the pipe's end stops this one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    watermark = int(engine.gen.configs.continuous_batch.watermark * engine.num_blocks)
    conn.send(("ready", EngineFacts(engine.tokenizer, engine.model_config, engine.config, engine.config.model_name,
                                    engine.max_model_len, engine.model_config.vocab_size,
                                    (engine.num_blocks - watermark) * engine.block_size, startup_summary(engine))))
    return engine


def run_engine_core(config: EngineConfig, conn: Connection, progress: bool) -> None:
    """The engine process's main function (multiprocessing target)."""
    from vibee.runtime.offline import freeze_heap

    try:
        engine = _start(config, conn, progress)
    except KeyboardInterrupt:  # Ctrl-C while loading: the server's process is stopping too
        return
    if engine is not None:
        freeze_heap()
        try:
            EngineCore(engine, conn).run()
        except (EOFError, OSError):
            pass  # the server's process is gone: nobody to serve
        except RankLost as exc:  # the server reports the engine process's exit to its clients
            log.error("%s; stopping the engine", exc)
        finally:
            engine.close()


class EngineCore:
    def __init__(self, engine, conn: Connection):
        self.engine = engine
        self.conn = conn
        self.stats = _StatsBuffer()
        engine.add_observer(self.stats)
        self.stopping = False
        # ("add" messages, the token DFA their grammar waits for): added once it is compiled.
        self._compiling: list[tuple[tuple, str, Future]] = []
        self._compiler: ThreadPoolExecutor | None = None

    def run(self) -> None:
        engine = self.engine
        while True:
            self._add_compiled()
            busy = engine.has_unfinished()
            while self.conn.poll(0 if busy else COMPILE_POLL_S if self._compiling else IDLE_POLL_S):
                self._handle(self.conn.recv())
                busy = True  # drain everything that arrived before stepping
            if engine.ranks is not None:
                engine.ranks.check()  # a worker gone between steps ends the engine now, not at the next request
            if not engine.has_unfinished():
                if self.stopping and not self._compiling:  # an accepted request still compiling runs first
                    return
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # a bug or an out-of-memory: fail what is in flight, keep serving
                if engine.ranks is not None:  # ...unless over ranks, which this step may have left out of step
                    raise RankLost(f"a step failed over {engine.ranks.size} tensor-parallel ranks: {exc}") from exc
                log.exception("engine step failed; failing the requests in flight")
                ids = engine.request_ids()
                for request_id in ids:
                    engine.abort_request(request_id)
                self.stats.take()
                self.conn.send(("step_failed", ids, f"the engine failed while running this request: {exc}"))
                continue
            self._send(outputs)

    def _add(self, msg: tuple) -> None:
        _, request_id, prompt, params, arrival, share_rank = msg
        try:
            self.engine.add_request(request_id, prompt, params, arrival, share_rank=share_rank)
        except ValueError as exc:
            self.conn.send(("refused", request_id, str(exc)))

    def _add_compiled(self) -> None:
        """Add the requests whose token DFA is now compiled (in arrival order among them)."""
        if not any(future.done() for _, _, future in self._compiling):
            return
        waiting = []
        for msg, pattern, future in self._compiling:
            if future.done():
                try:
                    dfa = future.result()
                except Exception as exc:  # noqa: BLE001 - a compiler bug: the grammar goes to llguidance
                    log.exception("compiling a token DFA failed")
                    dfa = NotRegular(f"compiling its DFA failed: {exc}")
                self.engine.structured.dfas.install(pattern, dfa)
                self._add(msg)
            else:
                waiting.append((msg, pattern, future))
        self._compiling = waiting

    def _send(self, outputs: list[RequestOutput]) -> None:
        steps, finished = self.stats.take()
        self.conn.send(("step", [delta_of(o) for o in outputs], steps, finished))

    def _handle(self, msg: tuple) -> None:
        """One message from the server's process."""
        engine, kind = self.engine, msg[0]
        if kind == "add":
            pattern = engine.structured.pattern_to_compile(msg[3].structured_output)
            if pattern is None:
                self._add(msg)
            else:
                if self._compiler is None:
                    self._compiler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vibee-grammar")
                self._compiling.append((msg, pattern, self._compiler.submit(engine.structured.dfas.compile_apart, pattern)))
        elif kind in ("abort", "abort_all"):
            ids = [msg[1]] if kind == "abort" else engine.request_ids() + [m[1] for m, _, _ in self._compiling]
            self._compiling = [entry for entry in self._compiling if entry[0][1] not in ids]
            finals = [engine.abort_request(request_id) for request_id in ids]
            # The gauges as the aborts left them: with nothing left to step, no step would report them.
            self.stats.steps.append(engine.step_outputs.gauges())
            self._send([f for f in finals if f is not None])
        elif kind == "call":
            _, call_id, name = msg
            self.conn.send(("reply", call_id, engine.info() if name == "info" else engine.stats()))
        elif kind == "shutdown":
            self.stopping = True
