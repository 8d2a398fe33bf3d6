"""What becomes of a launched step once its tokens are read (vLLM's output processing): the
placeholders the scheduler saw replaced by the real tokens (a stop token among them ends its
sequence there), stop strings applied, text made, one RequestOutput per request that changed,
finished requests retired, and the step recorded in the engine's figures.

The engine resolves each step while the next one runs on the device (engine.py's step loop).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from vibee.runtime.engine_report import EngineStats
from vibee.runtime.launched_step import LaunchedStep
from vibee.runtime.outputs import RequestOutput, StepStats
from vibee.runtime.requests import Choice, Request, accept_token, choice_output
from vibee.runtime.sampler import SampleResult


class StepOutputs:
    def __init__(self, scheduler: Any, block_manager: Any, sampler: Any, multi_step: Any, report: EngineStats,
                 requests: dict[str, Request], retire: Callable[[Request, float], None], *, num_blocks: int,
                 block_size: int):
        """requests: the engine's live requests by id (shared, not copied); retire(req, now):
        the engine's end of a finished request."""
        self.scheduler, self.block_manager, self.sampler, self.multi_step = scheduler, block_manager, sampler, multi_step
        self.report, self.requests, self.retire = report, requests, retire
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_generated = 0  # tokens read back so far (the speed gate's numerator)
        self.last_read = 0.0  # perf_counter when the last step's tokens were read

    def gauges(self, **figures) -> StepStats:
        """The running/waiting/KV-use gauges as they stand, with a step's figures (none: zeros)."""
        counts = dict(num_preemptions=0, prefix_cache_queries=0, prefix_cache_hits=0, num_prompt_tokens=0,
                      num_generation_tokens=0, batch_size=0, step_time=0.0)
        return StepStats(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                         kv_cache_usage=1.0 - self.block_manager.num_free_blocks() / self.num_blocks,
                         **{**counts, **figures})

    def resolve(self, launched: LaunchedStep) -> list[RequestOutput]:
        """A launched step's tokens, read back: placeholders replaced, stop tokens and strings
        applied, text made, outputs reported, finished requests retired, the step recorded."""
        placeholders = launched.placeholders
        emitted = None
        if launched.rounds is not None:
            emitted = self.multi_step.finish(launched.rounds)
        elif placeholders:
            read = self.sampler.collect(launched.pending)
        now = time.monotonic()
        changed: dict[str, tuple[Request, list[Choice]]] = {}
        finish_stopped = self.scheduler.finish_stopped
        num_generated = 0
        for s, ((seq, _, _, req, choice), start) in enumerate(zip(launched.sampling, launched.before)):
            if choice.finish_reason is not None or self.requests.get(req.request_id) is not req:
                continue  # it ended (a stop, an abort) while this step ran: its token is dropped
            if emitted is not None:
                results = [SampleResult(t, None, None) for t in emitted[s]]
                self._put_tokens(seq, start, emitted[s])
            elif placeholders:
                result = read[placeholders[seq.seq_id]]
                results = [result]
                seq.output_token_ids[start] = result.token_id
                self.block_manager.set_tokens(seq.seq_id, len(seq.prompt_token_ids) + start, (result.token_id,))
                if result.token_id in seq.stop_token_ids:
                    self._stop_token_at(seq, start)
            else:
                results = launched.results[seq.seq_id]
            for i, result in enumerate(results[: len(seq.output_token_ids) - start]):
                num_generated += 1
                # The scheduler's status is about the sequence's last token: only that one finishes it.
                last = start + i == len(seq.output_token_ids) - 1
                if accept_token(req, choice, seq.output_token_ids[start + i], result, now, last, finish_stopped):
                    del seq.output_token_ids[start + i + 1:]  # a stop string ended it here
                    break
            entry = changed.get(req.request_id)
            if entry is None:
                changed[req.request_id] = (req, [choice])
            else:
                entry[1].append(choice)

        outputs = []
        for req, choices in changed.values():
            if len(choices) > 1:
                choices.sort(key=lambda c: c.index)
            finished = req.finished
            outputs.append(RequestOutput(req.request_id, req.prompt_token_ids, [choice_output(c) for c in choices],
                                         finished, req.num_cached_tokens, req.prompt_logprobs))
            req.prompt_logprobs = None  # reported once
            if finished:
                self.retire(req, now)

        step_time = time.perf_counter() - max(launched.started, self.last_read)
        self.last_read = time.perf_counter()
        stats = self.gauges(
            num_preemptions=len(launched.sched.preempted),
            prefix_cache_queries=(self.block_manager.prefix_cache_queries - launched.prefix_queries) * self.block_size,
            prefix_cache_hits=(self.block_manager.prefix_cache_hits - launched.prefix_hits) * self.block_size,
            num_prompt_tokens=launched.new_prompt_tokens, num_generation_tokens=num_generated,
            batch_size=len(launched.sched.scheduled), step_time=step_time)
        self.report.record_step(stats, launched.computed_prefill, now)
        self.num_generated += num_generated
        return outputs

    def _put_tokens(self, seq, start: int, tokens: list[int]) -> None:
        """A multi-step's tokens in place of the placeholders from output index `start` on; the
        first stop token among them ends the sequence there."""
        outputs = seq.output_token_ids
        tokens = tokens[: len(outputs) - start]
        outputs[start: start + len(tokens)] = tokens
        self.block_manager.set_tokens(seq.seq_id, len(seq.prompt_token_ids) + start, tokens)
        for j, token in enumerate(tokens):
            if token in seq.stop_token_ids:
                self._stop_token_at(seq, start + j)
                return

    def _stop_token_at(self, seq, index: int) -> None:
        """The token read back at output index is a stop token, which the scheduler saw as a
        placeholder: end the sequence there, dropping the next step's placeholder after it."""
        del seq.output_token_ids[index + 1:]
        if self.scheduler.finish_stopped(seq.seq_id) is None:
            # The placeholder after it had reached max_tokens: finished, blocks freed already.
            seq.status = type(seq.status).FINISHED_STOPPED
