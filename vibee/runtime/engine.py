"""The offline engine: requests -> generated scheduler -> model runner over the generated paged KV
cache and attention -> sampler -> incremental detokenizer and stop strings -> outputs.

One thread drives it (`step` is not reentrant); vibee/runtime/async_engine.py puts it behind
asyncio for the server. Each choice of a request (n > 1) is its own scheduler Sequence; they
share the prompt's KV blocks through the prefix cache.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch

from vibee.runtime.config import EngineConfig
from vibee.runtime.detokenizer import IncrementalDetokenizer
from vibee.runtime.device_rounds import DeviceRounds
from vibee.runtime.engine_report import EngineStats, applied_quantization, engine_info, engine_stats
from vibee.runtime.generated import GeneratedModules, load_generated
from vibee.runtime.kv_sizing import decide_num_blocks, host_kv_swap, paged_kv_cache, run_worst_case_step
from vibee.runtime.launched_step import LaunchedStep
from vibee.runtime.model_runner import ModelRunner, decode_graph_rows
from vibee.runtime.multi_step import MultiStep, plain_row
from vibee.runtime.one_step import launch_step
from vibee.runtime.outputs import RequestOutput
from vibee.runtime.rank_group import start_ranks
from vibee.runtime.requests import Choice, Request, check_request, choice_generator, choice_output
from vibee.runtime.round_steps import (chain_speculative_rounds, launch_multi_step, launch_speculative_rounds,
                                      read_speculative_rounds)
from vibee.runtime.sampler import Sampler
from vibee.runtime.sampling_params import SamplingParams
from vibee.runtime.served_model import load_served_model, max_model_len_for
from vibee.runtime.speculation import Speculator
from vibee.runtime.speed_gate import SpeedGate
from vibee.runtime.step_outputs import StepOutputs
from vibee.runtime.stop_strings import StopStringMatcher
from vibee.runtime.structured_output import StructuredOutputs
from vibee.runtime.grammar_table import DFAConstraint

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LLMEngine:
    """Build from an EngineConfig with `LLMEngine(config)`; then add_request / step / abort_request."""

    def __init__(self, config: EngineConfig, *, progress: bool = True):
        problems = config.unbuilt_features()
        if problems:
            raise ValueError("; ".join(problems))
        self.config = config
        self.device = config.resolve_device()
        self.dtype_name = config.resolve_dtype(self.device)
        self.dtype = TORCH_DTYPES[self.dtype_name]
        self.gen: GeneratedModules = load_generated(config.spec_dir, config.knob_settings(self.dtype_name))
        # tp_size > 1: workers mirror each forward over their shards (rank_group.py, rank_worker.py).
        self.ranks = start_ranks(config, self.gen, self.device)
        if self.ranks is not None:
            self.device = self.ranks.device
        try:
            self._build(config, progress)
        except BaseException:
            self.close()
            raise

    def _build(self, config: EngineConfig, progress: bool) -> None:
        kv_spec = self.gen.configs.kv_cache
        batch_spec = self.gen.configs.continuous_batch

        served = load_served_model(config, self.gen, dtype=self.dtype, device=self.device, progress=progress,
                                   ranks=self.ranks)
        self.model, self.model_config, self.tokenizer = served.model, served.config, served.tokenizer
        self.weight_bytes_loaded, self.weight_bytes, self.quant_stats = (served.weight_bytes_loaded, served.weight_bytes,
                                                                          served.quant_stats)
        self.quant_method, self.quant_source = served.quant_method, served.quant_source

        self.max_model_len = max_model_len_for(config, self.model_config)
        self.block_size = kv_spec.block_size
        self.use_kv_cache = config.kv_cache
        # Without a KV cache there is nothing to reuse: prefix caching is meaningless there.
        self.enable_prefix_caching = kv_spec.enable_prefix_caching and self.use_kv_cache
        self.max_num_seqs = batch_spec.max_num_seqs
        self.max_num_batched_tokens = batch_spec.max_num_batched_tokens

        # Before sizing the KV cache, so that the grammar table's device memory is counted as in use.
        self.eos_token_ids = set(self.model_config.eos_token_ids) | set(self.tokenizer.eos_token_ids)
        self.structured = StructuredOutputs(self.tokenizer, vocab_size=self.model_config.vocab_size,
                                            eos_token_ids=self.eos_token_ids, device=self.device)

        kv = self.gen.kv_cache
        self.num_kv_heads = served.num_kv_heads  # this rank's: all of them, or its shard's
        self.kv_bytes_per_block = paged_kv_cache(kv, self.model_config, self.num_kv_heads, 1, dtype=self.dtype,
                                                 device="meta", block_size=self.block_size).bytes_per_block()
        # Before sizing: a draft model's weights and activations take GPU memory too.
        self.speculative = config.speculating
        self.speculator = (Speculator(self.gen, config, self.model, dtype=self.dtype,
                                      device=self.device, block_size=self.block_size, progress=progress)
                           if self.speculative else None)
        # num_blocks: the blocks sequences can hold. CUDA graphs take one more, past them, as the
        # scratch that the padding rows of a captured batch write to.
        # memory_profile: filled when sized from a profiled GPU step.
        self.num_blocks, self.memory_profile = decide_num_blocks(
            config=config, kv_spec=kv_spec, device=self.device,
            bytes_per_block=self.kv_bytes_per_block + (self.speculator.draft_bytes_per_block(self.block_size)
                                                       if self.speculator is not None else 0),
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len, block_size=self.block_size, wants_graphs=self._wants_graphs(),
            run_worst_case_step=self._run_worst_case_step)
        if self.ranks is not None:
            self.num_blocks = self.ranks.agree_num_blocks(self.num_blocks)
        scratch = 1 if self._wants_graphs() else 0
        self.kv_cache = (paged_kv_cache(kv, self.model_config, self.num_kv_heads, self.num_blocks + scratch,
                                        dtype=self.dtype, device=self.device, block_size=self.block_size)
                         if self.use_kv_cache else None)
        self.block_manager = kv.BlockManager(self.num_blocks, self.block_size, self.enable_prefix_caching)
        # preemption_mode swap: host slots for preempted sequences' KV, which the runner copies.
        host_swap = host_kv_swap(kv, batch_spec, self.kv_cache, self.kv_bytes_per_block)
        swap = host_swap is not None
        if self.speculator is not None:
            self.speculator.start_draft_cache(kv, num_blocks=self.num_blocks, max_batched_tokens=self.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.kv_cache, self.block_manager, device=self.device,
                                  block_size=self.block_size, num_blocks=self.num_blocks, graph_rows=decode_graph_rows(
                                      self.max_num_seqs, self.gen.configs.speculative_decode if self.speculative else None),
                                  max_model_len=self.max_model_len, max_num_batched_tokens=self.max_num_batched_tokens,
                                  use_graphs=bool(scratch), host_swap=host_swap, ranks=self.ranks,
                                  num_splits=self.gen.flash_attention.num_splits_for(self.max_model_len))
        self.graphs, self.graph_error = self.runner.graphs, self.runner.graph_error
        if self.speculator is not None:
            self.speculator.start_rounds(self.graphs, max_num_seqs=self.max_num_seqs, max_model_len=self.max_model_len,
                                         padding_slot=self.num_blocks * self.block_size,
                                         max_batched_tokens=self.max_num_batched_tokens)
        self.scheduler = self.gen.continuous_batch.Scheduler(
            self.block_manager, policy=batch_spec.policy, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            enable_chunked_prefill=batch_spec.enable_chunked_prefill,
            long_prefill_token_threshold=batch_spec.long_prefill_token_threshold, watermark=batch_spec.watermark,
            preemption_mode="swap" if swap else "recompute", num_swap_slots=host_swap.num_slots if swap else 0)
        self.sampler = Sampler(seed=config.seed, device=self.device, structured=self.structured)
        # Plain decoding in rounds on the device (multi_step.py), with decode graphs; with --speculative
        # while the speed gate holds plain decoding, so that speculation is measured against it.
        self.multi_step = (MultiStep(self.graphs, self.sampler, max_rounds=batch_spec.num_scheduler_steps,
                                     max_num_seqs=self.max_num_seqs, max_model_len=self.max_model_len,
                                     block_size=self.block_size, padding_slot=self.num_blocks * self.block_size,
                                     device=self.device, grammar=self.structured.table)
                           if self.graphs is not None and batch_spec.num_scheduler_steps > 1 else None)

        # With --speculative: whether drafting pays right now, measured against plain decoding.
        self.speed_gate = SpeedGate() if self.speculative else None
        self._in_flight: LaunchedStep | None = None  # the step whose tokens are not read yet
        self._num_penalized = 0  # requests with penalties or a host grammar: every token on the host before a step
        self._num_unplain = 0  # requests whose rows can't be sampled in rounds (multi_step.plain_row)
        self._requests: dict[str, Request] = {}
        self._by_seq: dict[int, tuple[Request, Choice]] = {}
        self._seq_ids = itertools.count()
        self.report = EngineStats()
        self.step_outputs = StepOutputs(self.scheduler, self.block_manager, self.sampler, self.multi_step, self.report,
                                        self._requests, self._retire, num_blocks=self.num_blocks,
                                        block_size=self.block_size)

    # --- sizing and speculation ----------------------------------------------------------------

    def _run_worst_case_step(self) -> None:
        """The largest step the engine can run (see kv_sizing.run_worst_case_step)."""
        spec = self.speculator
        run_worst_case_step(
            self.model, device=self.device, block_size=self.block_size,
            max_num_batched_tokens=self.max_num_batched_tokens, max_num_seqs=self.max_num_seqs,
            max_model_len=self.max_model_len, num_speculative_tokens=spec.num_speculative_tokens if spec else 0,
            draft_step=(lambda: spec.worst_case_draft_step(self.max_num_batched_tokens, self.max_num_seqs,
                                                           self.max_model_len)) if spec else None)

    @property
    def acceptance(self):
        """The speculator's acceptance tracker (the benchmark resets it); only when speculating."""
        return self.speculator.acceptance

    def _wants_graphs(self) -> bool:
        # Over ranks, steps run eagerly: each forward's inputs go to the workers first.
        return (self.device.startswith("cuda") and self.use_kv_cache and self.config.flash_attn
                and not self.config.enforce_eager and self.ranks is None)

    def close(self) -> None:
        """Stop the tensor-parallel workers (if any); the engine takes no step after this."""
        if self.ranks is not None:
            self.ranks.close()

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    # --- requests ------------------------------------------------------------------------------

    def check_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError with a user-facing message if this request can't be served."""
        watermark = int(self.gen.configs.continuous_batch.watermark * self.num_blocks)
        check_request(prompt_token_ids, params, vocab_size=self.model_config.vocab_size,
                      max_model_len=self.max_model_len, kv_tokens=(self.num_blocks - watermark) * self.block_size)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None, *, share_rank: int = 0) -> None:
        """Queue a request. Its choices are ranks share_rank, share_rank + 1, ... among the
        sequences of one client request: under the scheduler's "fair" policy (the spec's default)
        every request's rank 0 runs before any request's rank 1, so n = 16 or a batch of prompts
        takes turns with the requests behind it instead of going first whole."""
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already running")
        self.check_prompt(prompt_token_ids, params)
        req = Request(request_id, list(prompt_token_ids), params, arrival_time or time.monotonic())
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = self.runner.score_prompt(req.prompt_token_ids, params.prompt_logprobs)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        constraints = (self.structured.constraints(params.structured_output, params.n)
                       if params.structured_output is not None else [None] * params.n)
        for index in range(params.n):
            seq = self.gen.continuous_batch.Sequence(next(self._seq_ids), list(prompt_token_ids), params.max_tokens,
                                                     arrival_time=req.arrival_time, stop_token_ids=frozenset(stop_ids),
                                                     share_rank=share_rank + index)
            choice = Choice(index, seq, IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens),
                             StopStringMatcher(list(params.stop), params.include_stop_str_in_output),
                             choice_generator(params.seed, index, self.device),
                             logprobs=[] if params.logprobs is not None else None,
                             constraint=constraints[index])
            req.choices.append(choice)
        for choice in req.choices:  # all or nothing: a refused choice leaves none behind
            try:
                self.scheduler.add(choice.seq)
            except ValueError:
                for other in req.choices:
                    self.scheduler.abort(other.seq.seq_id)
                    if other.constraint is not None:
                        other.constraint.release()
                raise
            self._by_seq[choice.seq.seq_id] = (req, choice)
        self._requests[request_id] = req
        self._num_penalized += _needs_host_tokens(req)
        self._num_unplain += not plain_row(params, req.choices[0].generator, req.choices[0].constraint)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Drop a request wherever it is; its KV blocks are freed now (a step in flight that
        still writes to them is ordered before any later owner's). Returns its final output:
        the tokens read back so far; one sampled in the step in flight is dropped."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        self._num_penalized -= _needs_host_tokens(req)
        self._num_unplain -= not plain_row(req.params, req.choices[0].generator, req.choices[0].constraint)
        changed = []
        for choice in req.choices:
            self.scheduler.abort(choice.seq.seq_id)
            self._release(choice.seq.seq_id)
            if choice.finish_reason is None:
                choice.finish_reason = "abort"
                changed.append(choice)
        self.report.totals["requests_aborted"] += 1
        self.report.request_finished(req, "abort", time.monotonic())
        if not self._requests and self._in_flight is not None:  # nothing left to report it to: read and recorded
            launched, self._in_flight = self._in_flight, None
            if launched.unread_rounds:
                read_speculative_rounds(launched, self.speculator, self.scheduler, self._by_seq)
            self.step_outputs.resolve(launched)
        return RequestOutput(req.request_id, req.prompt_token_ids, [choice_output(c) for c in changed], True,
                             req.num_cached_tokens)

    def has_unfinished(self) -> bool:
        """Requests not finished (a step in flight always has one, unless all were aborted)."""
        return bool(self._requests)

    def request_ids(self) -> list[str]:
        return list(self._requests)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    # --- one step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule and launch the next step, then resolve the previous one (its tokens read,
        stops applied, text made) while the GPU runs it, and report every request that changed.
        Outputs come a step after their tokens were sampled; a step whose inputs need the
        previous tokens on the host (host drafts, penalties) waits for them first. Speculative
        rounds are recorded only once read: the next step's rounds queue behind them first."""
        started, generated = time.perf_counter(), self.step_outputs.num_generated
        outputs: list[RequestOutput] = []
        previous, self._in_flight = self._in_flight, None
        # This step waits for a prefill step it resolves: the speed gate times neither.
        prefill = previous is not None and previous.computed_prefill > 0
        forwards = previous.num_rounds if previous is not None else 1  # what the tokens reported took
        if self.speculator is not None:
            self.speculator.catch_up_tokens = 0
        launched = None
        if previous is not None and previous.unread_rounds:
            # Speculative rounds in flight: queue the next step's behind them if it can run
            # rounds too, then read them (the GPU runs the new rounds meanwhile).
            if self._speculating() and not self.speculator.resting(self.scheduler.running):
                launched = chain_speculative_rounds(previous, self.scheduler, self.block_manager, self.runner,
                                                    self.speculator, self._by_seq, self.max_num_batched_tokens)
            read_speculative_rounds(previous, self.speculator, self.scheduler, self._by_seq)
        # Read the step in flight first when the next one needs its tokens on the host: to draft,
        # to apply penalties, or to start rounds after a plain step (rounds after rounds read each
        # sequence's last token on the device).
        elif previous is not None and previous.placeholders and (
                not self._can_overlap() or (previous.rounds is None and self._multi_step_ready())):
            outputs += self.step_outputs.resolve(previous)
            previous = None
        if launched is None:
            launched = self._launch(previous)
        if previous is not None:
            outputs += self.step_outputs.resolve(previous)
        # Every step is resolved during the next one: a step whose tokens were read at launch
        # (verified drafts, rounds, penalties) has its text, stops and outputs made while the
        # next step's GPU work runs, as a step with placeholders has.
        self._in_flight = launched
        if self.speed_gate is not None:
            prefill = prefill or (launched is not None and launched.computed_prefill > 0) \
                or self.speculator.drafter_prefilled()
            self.speed_gate.record(self.step_outputs.num_generated - generated, time.perf_counter() - started,
                                   prefill=prefill, forwards=forwards)
        return outputs

    def _multi_step_ready(self) -> int:
        return self.multi_step.ready(self.scheduler, self.max_num_batched_tokens) if self._multi_step_allowed() else 0

    def _multi_step_allowed(self) -> bool:
        """Whether plain decode steps may run as rounds: every request plain, not speculating."""
        return self.multi_step is not None and self._num_unplain == 0 and not self._speculating()

    def _speculating(self) -> bool:
        return self.speed_gate is not None and self.speed_gate.speculating

    def _can_overlap(self) -> bool:
        """Whether the next step may be scheduled before the last one's tokens are on the host."""
        return (not self._speculating() or self.speculator.resting(self.scheduler.running)) and self._num_penalized == 0

    def _launch(self, previous: LaunchedStep | None) -> LaunchedStep | None:
        """Schedule a step, queue its forward and sampling on the device, and advance the
        scheduler: with the sampled tokens when they must be read now, else with placeholders."""
        t0 = time.perf_counter()
        queries0, hits0 = self.block_manager.prefix_cache_queries, self.block_manager.prefix_cache_hits
        rounds = self.speculator.plan_step(self.scheduler, self._by_seq, self.runner, self.max_num_batched_tokens) \
            if self._speculating() else 0
        # Rounds start from each sequence's last token in their own buffer: after a plain step in flight it is not there.
        in_flight = previous is not None and bool(previous.placeholders) and previous.rounds is None
        plain_rounds = (self.multi_step.plan(self.scheduler, self.max_num_batched_tokens)
                        if self._multi_step_allowed() and not in_flight else 0)
        num_running = len(self.scheduler.running)
        sched = self.scheduler.schedule()
        for seq in sched.preempted:  # drafts proposed for this step; it will prefill again first
            seq.draft_token_ids = []
            self._drop_device_state(seq.seq_id)
        if sched.is_empty:
            return None
        if rounds and self.speculator.rounds.fits(sched, num_running):
            return launch_speculative_rounds(sched, rounds, self.runner, self.speculator, self._by_seq,
                                             (t0, queries0, hits0), chained=False)
        if rounds:
            self.speculator.rounds.unplan(sched)
        if plain_rounds and self.multi_step.fits(sched, num_running):
            return launch_multi_step(sched, plain_rounds, self.runner, self.multi_step, self.scheduler, self._by_seq,
                                     (t0, queries0, hits0))
        if plain_rounds:
            DeviceRounds.unplan(sched)
        return launch_step(sched, previous, self.runner, self.sampler, self.speculator, self.scheduler, self._by_seq,
                           self._can_overlap(), (t0, queries0, hits0))

    def _retire(self, req: Request, now: float) -> None:
        del self._requests[req.request_id]
        self._num_penalized -= _needs_host_tokens(req)
        self._num_unplain -= not plain_row(req.params, req.choices[0].generator, req.choices[0].constraint)
        for choice in req.choices:
            self._release(choice.seq.seq_id)
        reasons = {c.finish_reason for c in req.choices}
        self.report.totals["requests_finished"] += 1
        self.report.request_finished(req, "length" if reasons == {"length"} else "stop" if "stop" in reasons else "abort", now)

    def _drop_device_state(self, seq_id: int) -> None:
        """A preempted sequence gives back its rows of the device rounds (one per seat: kept while
        it waits, they run out once displaced sequences outnumber the seats) and the draft's
        cache; it uploads its tokens again when it next runs."""
        if self.multi_step is not None:
            self.multi_step.forget(seq_id)
        if self.speculator is not None:
            self.speculator.preempted(seq_id)

    def _release(self, seq_id: int) -> None:
        """What the engine kept for a sequence that is done (the scheduler freed its blocks)."""
        entry = self._by_seq.pop(seq_id, None)
        if entry is not None and entry[1].constraint is not None:
            entry[1].constraint.release()
        self.runner.release(seq_id)
        if self.speculator is not None:
            self.speculator.forget(seq_id)
        if self.multi_step is not None:
            self.multi_step.forget(seq_id)

    # --- figures -------------------------------------------------------------------------------

    def add_observer(self, observer: Any) -> None:
        """observer.on_step(StepStats) after each step; observer.on_request_finished(RequestStats)."""
        self.report.observers.append(observer)

    def applied_quantization(self) -> dict[str, Any] | None:
        """How the served model's weights are quantized (None: full precision)."""
        return applied_quantization(self.quant_stats, self.gen.quantization, self.quant_method, self.quant_source)

    def info(self) -> dict[str, Any]:
        """The optimizations as the specs and flags resolved them, plus the model."""
        return engine_info(self)

    def stats(self) -> dict[str, Any]:
        """Live measured figures; nothing here is a constant."""
        return engine_stats(self)


def _needs_host_tokens(req: Request) -> bool:
    """Whether a request's next step needs its last tokens on the host: penalties, a bias or a
    minimum length, or a grammar llguidance masks there (a token DFA's state is on the device)."""
    params = req.params
    return params.has_logit_rules or (params.structured_output is not None
                                      and not isinstance(req.choices[0].constraint, DFAConstraint))
