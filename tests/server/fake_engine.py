"""A deterministic stand-in for vibee.runtime.async_engine.AsyncEngine, for fast server tests.

It has the same interface (tokenizer, config, model_config, served_model_name, max_model_len,
is_alive, info, stats, add_observer, check_prompt, generate, shutdown) and "generates" by
reading characters off a script with a one-character-per-token tokenizer, so tests can predict
every output. It honours n, max_tokens, stop strings (through the real StopStringMatcher),
stop_token_ids, ignore_eos, logprobs and seeds, and records what happened to each request:
`started`, `finished`, `aborted` (a generate iterator closed or cancelled before the end).
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any, AsyncIterator

from vibee.runtime.outputs import CompletionOutput, RequestOutput, RequestStats, StepStats, TokenLogprob
from vibee.runtime.sampling_params import SamplingParams
from vibee.runtime.stop_strings import StopStringMatcher

SCRIPT = "the quick brown fox jumps over the lazy dog. "


class EngineClosed(Exception):
    """Matched by name by the server, like the real engine's."""


class ToyTokenizer:
    """One token per printable ASCII character (id = its code) plus newline; 0-2 are special."""

    UNK, BOS, EOS = 0, 1, 2
    _SPECIAL = {0: "<unk>", 1: "<s>", 2: "</s>"}

    vocab_size = 128
    bos_token_id = BOS
    eos_token_ids = {EOS}
    all_special_ids = {UNK, BOS, EOS}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [ord(c) if (32 <= ord(c) < 127 or c == "\n") else self.UNK for c in text]
        return [self.BOS, *ids] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            if i in self._SPECIAL:
                if not skip_special_tokens:
                    out.append(self._SPECIAL[i])
            else:
                out.append(chr(i))
        return "".join(out)

    def id_to_token(self, i: int) -> str | None:
        return self._SPECIAL.get(i, chr(i)) if 0 <= i < self.vocab_size else None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        text = "".join(f"[{m['role']}] {m['content']}\n" for m in messages)
        return text + ("[assistant] " if add_generation_prompt else "")


def expected_text(n_tokens: int, *, index: int = 0, seed: int | None = None, greedy: bool = True) -> str:
    """What FakeEngine generates for a choice (before stop strings / EOS)."""
    start = 0 if greedy else (7 * index + (seed or 0)) % len(SCRIPT)
    return "".join(SCRIPT[(start + k) % len(SCRIPT)] for k in range(n_tokens))


def fake_logprob(position: int) -> float:
    return -0.25 * (1 + position % 4)


class _Choice:
    def __init__(self, index: int, params: SamplingParams):
        self.index = index
        self.start = 0 if params.temperature == 0 else (7 * index + (params.seed or 0)) % len(SCRIPT)
        self.token_ids: list[int] = []
        self.text = ""
        self.reported_text = ""
        self.reported_tokens = 0
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.reported_logprobs = 0
        self.stop = StopStringMatcher(list(params.stop), params.include_stop_str_in_output)
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    def output(self) -> CompletionOutput:
        delta_lp = None
        if self.logprobs is not None:
            delta_lp = self.logprobs[self.reported_logprobs:]
            self.reported_logprobs = len(self.logprobs)
        out = CompletionOutput(self.index, self.text, list(self.token_ids), self.text[len(self.reported_text):],
                               self.token_ids[self.reported_tokens:], delta_lp,
                               list(self.logprobs) if self.logprobs is not None else None,
                               self.finish_reason, self.stop_reason)
        self.reported_text, self.reported_tokens = self.text, len(self.token_ids)
        return out


class FakeEngine:
    def __init__(self, *, max_model_len: int = 256, served_model_name: str = "fake-model",
                 eos_after: int | None = None, delay: float = 0.0, fail_after: int | None = None,
                 num_cached_tokens: int = 0):
        self.tokenizer = ToyTokenizer()
        self.served_model_name = served_model_name
        self.max_model_len = max_model_len
        self.model_config = SimpleNamespace(vocab_size=self.tokenizer.vocab_size,
                                            max_position_embeddings=max_model_len)
        self.config = SimpleNamespace(served_model_name=served_model_name, model_name=served_model_name,
                                      max_model_len=max_model_len)
        # Knobs tests may change between requests.
        self.eos_after = eos_after  # emit EOS as the choice's token number eos_after (0-based)
        self.delay = delay  # seconds per step
        self.fail_after = fail_after  # raise RuntimeError after this many steps
        self.num_cached_tokens = num_cached_tokens
        self.observers: list[Any] = []
        self.started: list[tuple[str, list[int], SamplingParams]] = []
        self.finished: list[str] = []
        self.aborted: list[str] = []
        self.running: set[str] = set()
        self.closed = False
        self.alive = True

    # --- what the server reads ----------------------------------------------------------------

    def is_alive(self) -> bool:
        return self.alive and not self.closed

    def info(self) -> dict[str, Any]:
        return {"model": self.served_model_name, "max_model_len": self.max_model_len, "engine": "fake"}

    def stats(self) -> dict[str, Any]:
        return {"running": len(self.running), "finished": len(self.finished), "aborted": len(self.aborted)}

    def add_observer(self, observer: Any) -> None:
        self.observers.append(observer)

    def check_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty; it needs at least one token")
        if n + params.max_tokens > self.max_model_len:
            raise ValueError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                             f"requested {n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} for "
                             "the completion). Please reduce the prompt or max_tokens.")

    async def shutdown(self, timeout: float = 0.0) -> None:
        self.closed = True

    # --- generation ---------------------------------------------------------------------------

    def _next_token(self, choice: _Choice, params: SamplingParams) -> int:
        pos = len(choice.token_ids)
        if self.eos_after is not None and pos == self.eos_after:
            return ToyTokenizer.EOS
        return ord(SCRIPT[(choice.start + pos) % len(SCRIPT)])

    def _advance(self, choice: _Choice, params: SamplingParams) -> None:
        pos = len(choice.token_ids)
        token = self._next_token(choice, params)
        choice.token_ids.append(token)
        if choice.logprobs is not None:
            lp = fake_logprob(pos)
            # Best first: the sampled token, then the next characters of the script.
            alts = [(token, lp)] + [(ord(SCRIPT[(choice.start + pos + k) % len(SCRIPT)]), lp - k) for k in range(1, 20)]
            choice.logprobs.append(TokenLogprob(token, lp, alts[:params.logprobs]))
        if token in params.stop_token_ids:
            choice.text += choice.stop.flush()
            choice.finish_reason, choice.stop_reason = "stop", token
            return
        if token == ToyTokenizer.EOS and not params.ignore_eos:
            choice.text += choice.stop.flush()
            choice.finish_reason = "stop"
            return
        piece = self.tokenizer.decode([token], skip_special_tokens=params.skip_special_tokens)
        emit, stopped = choice.stop.feed(piece)
        choice.text += emit
        if stopped is not None:
            choice.finish_reason, choice.stop_reason = "stop", stopped
        elif len(choice.token_ids) >= params.max_tokens:
            choice.text += choice.stop.flush()
            choice.finish_reason = "length"

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str, share_rank: int = 0) -> AsyncIterator[RequestOutput]:
        if self.closed:
            raise EngineClosed("the server is shutting down")
        self.check_prompt(prompt_token_ids, params)
        if request_id in self.running:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.started.append((request_id, list(prompt_token_ids), params))
        self.running.add(request_id)
        arrival = time.monotonic()
        choices = [_Choice(i, params) for i in range(params.n)]
        steps = 0
        first_token: float | None = None
        last_token = arrival
        gaps: list[float] = []
        try:
            while True:
                await asyncio.sleep(self.delay)
                if self.fail_after is not None and steps >= self.fail_after:
                    raise RuntimeError("fake engine failure")
                steps += 1
                live = [c for c in choices if c.finish_reason is None]
                for c in live:
                    self._advance(c, params)
                t = time.monotonic()
                if first_token is None:
                    first_token = t
                else:
                    gaps.append(t - last_token)
                last_token = t
                finished = all(c.finish_reason is not None for c in choices)
                step = StepStats(num_running=len(self.running), num_waiting=0, kv_cache_usage=0.5,
                                 num_preemptions=0, prefix_cache_queries=len(prompt_token_ids) if steps == 1 else 0,
                                 prefix_cache_hits=self.num_cached_tokens if steps == 1 else 0,
                                 num_prompt_tokens=len(prompt_token_ids) if steps == 1 else 0,
                                 num_generation_tokens=len(live), batch_size=len(live), step_time=self.delay)
                for obs in self.observers:
                    obs.on_step(step)
                if finished:
                    self._finish(request_id, "stop" if any(c.finish_reason == "stop" for c in choices) else "length",
                                 prompt_token_ids, choices, arrival, first_token, gaps)
                yield RequestOutput(request_id, list(prompt_token_ids), [c.output() for c in live], finished,
                                    self.num_cached_tokens)
                if finished:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            # The consumer left early: the real engine aborts the request and frees its blocks here.
            if request_id in self.running:
                self.aborted.append(request_id)
                self._finish(request_id, "abort", prompt_token_ids, choices, arrival, first_token, gaps)
            raise
        finally:
            self.running.discard(request_id)

    def _finish(self, request_id, reason, prompt, choices, arrival, first_token, gaps) -> None:
        self.running.discard(request_id)
        if reason != "abort":
            self.finished.append(request_id)
        now = time.monotonic()
        stats = RequestStats(request_id=request_id, finish_reason=reason, num_prompt_tokens=len(prompt),
                             num_generation_tokens=sum(len(c.token_ids) for c in choices), queue_time=0.0,
                             time_to_first_token=None if first_token is None else first_token - arrival,
                             e2e_latency=now - arrival, inter_token_latencies=list(gaps))
        for obs in self.observers:
            obs.on_request_finished(stats)
