"""The offline engine: requests -> generated scheduler -> model runner over the generated paged KV
cache and attention -> sampler -> incremental detokenizer and stop strings -> outputs.

One thread drives it (`step` is not reentrant); vibee/runtime/async_engine.py puts it behind
asyncio for the server. Each choice of a request (n > 1) is its own scheduler Sequence; they
share the prompt's KV blocks through the prefix cache.
"""

from __future__ import annotations

import gc
import itertools
import math
import time
from typing import Any, Callable

import torch

from vibee.runtime.attention import make_attention_batch
from vibee.runtime.block_table_rows import BlockTableRows
from vibee.runtime.config import EngineConfig
from vibee.runtime.detokenizer import IncrementalDetokenizer
from vibee.runtime.engine_report import EngineStats, applied_quantization, engine_info, engine_stats
from vibee.runtime.generated import GeneratedModules, load_generated
from vibee.runtime.kv_sizing import decide_num_blocks, run_worst_case_step
from vibee.runtime.loader import load_model_dir
from vibee.runtime.model import build_model
from vibee.runtime.outputs import CompletionOutput, RequestOutput, StepStats
from vibee.runtime.requests import Choice, Request, accept_token, choice_generator, choice_output, token_slice
from vibee.runtime.sampler import SampleResult, Sampler, SamplingRow
from vibee.runtime.sampling_params import SamplingParams
from vibee.runtime.shapes import SyntheticTokenizer, random_model, shape_config
from vibee.runtime.speculation import Speculator
from vibee.runtime.stop_strings import StopStringMatcher

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
        kv_spec = self.gen.configs.kv_cache
        batch_spec = self.gen.configs.continuous_batch

        if config.shape is not None:  # random weights of a known shape; token ids carry no text
            self.model_config = shape_config(config.shape)
            self.tokenizer = SyntheticTokenizer(self.model_config.vocab_size)
            fa = self.gen.flash_attention if config.flash_attn else self.gen.flash_attention_reference
            self.model = random_model(self.model_config, fa, dtype=self.dtype, device=self.device, seed=config.seed)
        else:
            loaded = load_model_dir(config.model_dir, dtype=self.dtype, device=self.device, progress=progress)
            self.model_config = loaded.config
            self.tokenizer = loaded.tokenizer
            self.model = build_model(loaded, self.gen, flash_attn=config.flash_attn)
        self.model.eval()
        self.weight_bytes_loaded = self.gen.quantization.weight_bytes(self.model)
        self.quant_stats = None
        if config.quant != "none":
            skip_modules = self.gen.configs.quantization.skip_modules
            self.quant_stats = self.gen.quantization.quantize_model(self.model, skip_modules)
        self.weight_bytes = self.gen.quantization.weight_bytes(self.model)

        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings)
        if config.max_model_len and config.max_model_len > self.model_config.max_position_embeddings:
            raise ValueError(f"--max-model-len {config.max_model_len} is longer than the model's "
                             f"max_position_embeddings ({self.model_config.max_position_embeddings})")
        self.block_size = kv_spec.block_size
        self.use_kv_cache = config.kv_cache
        # Without a KV cache there is nothing to reuse: prefix caching is meaningless there.
        self.enable_prefix_caching = kv_spec.enable_prefix_caching and self.use_kv_cache
        self.max_num_seqs = batch_spec.max_num_seqs
        self.max_num_batched_tokens = batch_spec.max_num_batched_tokens

        kv = self.gen.kv_cache
        probe = kv.PagedKVCache(self.model_config.num_layers, 1, self.model_config.num_kv_heads,
                                self.model_config.head_dim, dtype=self.dtype, device="meta", block_size=self.block_size)
        self.kv_bytes_per_block = probe.bytes_per_block()
        # Before sizing: a draft model's weights and activations take GPU memory too.
        self.speculative = config.speculative or config.draft_model is not None
        self.speculator = (Speculator(self.gen, config, self.model_config.vocab_size, dtype=self.dtype,
                                      device=self.device, block_size=self.block_size, progress=progress)
                           if self.speculative else None)
        # num_blocks: the blocks sequences can hold. CUDA graphs take one more, past them, as the
        # scratch that the padding rows of a captured batch write to.
        # memory_profile: filled when sized from a profiled GPU step.
        self.num_blocks, self.memory_profile = decide_num_blocks(
            config=config, kv_spec=kv_spec, device=self.device, bytes_per_block=self.kv_bytes_per_block,
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len, block_size=self.block_size, wants_graphs=self._wants_graphs(),
            run_worst_case_step=self._run_worst_case_step)
        scratch = 1 if self._wants_graphs() else 0
        self.kv_cache = (kv.PagedKVCache(self.model_config.num_layers, self.num_blocks + scratch,
                                         self.model_config.num_kv_heads, self.model_config.head_dim, dtype=self.dtype,
                                         device=self.device, block_size=self.block_size) if self.use_kv_cache else None)
        self.graphs = self._capture_graphs() if scratch else None
        self.block_manager = kv.BlockManager(self.num_blocks, self.block_size, self.enable_prefix_caching)
        self.block_rows = BlockTableRows(self.block_manager.block_tables)
        self.scheduler = self.gen.continuous_batch.Scheduler(
            self.block_manager, policy=batch_spec.policy, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            enable_chunked_prefill=batch_spec.enable_chunked_prefill,
            long_prefill_token_threshold=batch_spec.long_prefill_token_threshold, watermark=batch_spec.watermark)
        self.sampler = Sampler(seed=config.seed, device=self.device)
        self.eos_token_ids = set(self.model_config.eos_token_ids) | set(self.tokenizer.eos_token_ids)

        self._requests: dict[str, Request] = {}
        self._by_seq: dict[int, tuple[Request, Choice]] = {}
        self._seq_ids = itertools.count()
        self.report = EngineStats()

    # --- sizing and speculation ----------------------------------------------------------------

    def _run_worst_case_step(self) -> None:
        """The largest step the engine can run (see kv_sizing.run_worst_case_step)."""
        spec = self.speculator
        run_worst_case_step(
            self.model, device=self.device, block_size=self.block_size,
            max_num_batched_tokens=self.max_num_batched_tokens, max_num_seqs=self.max_num_seqs,
            max_model_len=self.max_model_len, num_speculative_tokens=spec.num_speculative_tokens if spec else 0,
            draft_step=(lambda: spec.worst_case_draft_step(self.max_num_seqs, self.max_model_len)) if spec else None)

    @property
    def acceptance(self):
        """The speculator's acceptance tracker (the benchmark resets it); only when speculating."""
        return self.speculator.acceptance

    def _wants_graphs(self) -> bool:
        return (self.device.startswith("cuda") and self.use_kv_cache and self.config.flash_attn
                and not self.config.enforce_eager)

    def _capture_graphs(self):
        """CUDA graphs of decode steps up to max_num_seqs; None (eager) if the step can't be captured."""
        from vibee.runtime.cuda_graphs import capture_decode_graphs

        graphs, error = capture_decode_graphs(
            self.model, self.kv_cache, max_batch=self.max_num_seqs, max_model_len=self.max_model_len,
            block_size=self.block_size, padding_slot=self.num_blocks * self.block_size,
            num_splits=self.gen.flash_attention.num_splits_for(self.max_model_len))
        if error is not None:
            self.graph_error = error
        return graphs

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    # --- requests ------------------------------------------------------------------------------

    def check_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError with a user-facing message if this request can't be served."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty; it needs at least one token")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.model_config.vocab_size - 1})")
        if n + params.max_tokens > self.max_model_len:
            raise ValueError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                             f"requested {n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} for the "
                             "completion). Please reduce the prompt or max_tokens.")
        longest = n + params.max_tokens - 1
        watermark = int(self.gen.configs.continuous_batch.watermark * self.num_blocks)
        if math.ceil(longest / self.block_size) > self.num_blocks - watermark:
            raise ValueError(f"the request needs up to {longest} tokens of KV cache but the server holds "
                             f"{(self.num_blocks - watermark) * self.block_size}; reduce the prompt or max_tokens")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already running")
        self.check_prompt(prompt_token_ids, params)
        req = Request(request_id, list(prompt_token_ids), params, arrival_time or time.monotonic())
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        for index in range(params.n):
            seq = self.gen.continuous_batch.Sequence(next(self._seq_ids), list(prompt_token_ids), params.max_tokens,
                                                     arrival_time=req.arrival_time, stop_token_ids=frozenset(stop_ids))
            choice = Choice(index, seq, IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens),
                             StopStringMatcher(list(params.stop), params.include_stop_str_in_output),
                             choice_generator(params.seed, index, self.device),
                             logprobs=[] if params.logprobs is not None else None)
            req.choices.append(choice)
        for choice in req.choices:  # all or nothing: a refused choice leaves none behind
            try:
                self.scheduler.add(choice.seq)
            except ValueError:
                for other in req.choices:
                    self.scheduler.abort(other.seq.seq_id)
                raise
            self._by_seq[choice.seq.seq_id] = (req, choice)
        self._requests[request_id] = req

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Drop a request wherever it is; its KV blocks are freed now. Returns its final output."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        changed = []
        for choice in req.choices:
            self.scheduler.abort(choice.seq.seq_id)
            self._by_seq.pop(choice.seq.seq_id, None)
            self.block_rows.release(choice.seq.seq_id)
            if choice.finish_reason is None:
                choice.finish_reason = "abort"
                changed.append(choice)
        self.report.totals["requests_aborted"] += 1
        self.report.request_finished(req, "abort", time.monotonic())
        return RequestOutput(req.request_id, req.prompt_token_ids, [choice_output(c) for c in changed], True,
                             req.num_cached_tokens)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def request_ids(self) -> list[str]:
        return list(self._requests)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    # --- one step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and report every request that changed."""
        t0 = time.perf_counter()
        queries0, hits0 = self.block_manager.prefix_cache_queries, self.block_manager.prefix_cache_hits
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running, self._by_seq)
        sched = self.scheduler.schedule()
        now = time.monotonic()
        if sched.is_empty:
            return []
        new_prompt_tokens = computed_prefill = 0
        for item in sched.scheduled:
            if item.is_prefill:  # a sequence's first step always is
                computed_prefill += item.num_new_tokens
                req = self._by_seq[item.seq.seq_id][0]
                if req.first_scheduled_time is None:
                    new_prompt_tokens += len(req.prompt_token_ids)
                    req.first_scheduled_time = now
                    # Admission set num_computed_tokens to the prompt tokens the prefix cache had.
                    req.num_cached_tokens = item.seq.num_computed_tokens

        plan, logits = self._run_model(sched)
        # (sequence, first logits row, drafts, request, choice) of each sequence that samples.
        sampling = [(seq, row, drafts, *self._by_seq[seq.seq_id]) for seq, row, drafts in plan]
        # Plain rows sample one token; speculative rows verify their drafts (k + 1 logits each).
        plain = [s for s in sampling if not s[2]]
        results: list[SampleResult] = []
        if plain:
            # Every row plain: the logits are theirs, in order; no gather (its index copy waits for the GPU).
            x = logits if len(plain) == len(logits) else logits[[row for _, row, _, _, _ in plain]]
            results = self.sampler.sample(x, [SamplingRow(req.params, req.prompt_token_ids, seq.output_token_ids,
                                                          choice.generator) for seq, _, _, req, choice in plain])
        sampled: dict[int, object] = {s[0].seq_id: result.token_id for s, result in zip(plain, results)}
        step_results: dict[int, list[SampleResult]] = {s[0].seq_id: [result] for s, result in zip(plain, results)}
        for seq, row, drafts, req, choice in sampling:
            if drafts:
                tokens, seq_results = self.speculator.verify(req, choice, drafts, logits[row: row + len(drafts) + 1],
                                                             self.sampler)
                sampled[seq.seq_id] = tokens
                step_results[seq.seq_id] = seq_results
        before = [len(s[0].output_token_ids) for s in sampling]
        self.scheduler.update(sched, sampled)

        now = time.monotonic()
        changed: dict[str, tuple[Request, list[Choice]]] = {}
        num_generated = 0
        finish_stopped = self.scheduler.finish_stopped
        for (seq, _, _, req, choice), start in zip(sampling, before):
            new_tokens = seq.output_token_ids[start:]
            for i, (token, result) in enumerate(zip(new_tokens, step_results[seq.seq_id])):
                num_generated += 1
                if accept_token(req, choice, token, result, now, i == len(new_tokens) - 1, finish_stopped):
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
                                         finished, req.num_cached_tokens))
            if finished:
                self._retire(req, now)

        step_time = time.perf_counter() - t0
        stats = StepStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=1.0 - self.block_manager.num_free_blocks() / self.num_blocks,
            num_preemptions=len(sched.preempted),
            prefix_cache_queries=(self.block_manager.prefix_cache_queries - queries0) * self.block_size,
            prefix_cache_hits=(self.block_manager.prefix_cache_hits - hits0) * self.block_size,
            num_prompt_tokens=new_prompt_tokens, num_generation_tokens=num_generated,
            batch_size=len(sched.scheduled), step_time=step_time)
        self.report.record_step(stats, computed_prefill, now)
        return outputs

    def _run_model(self, sched) -> tuple[list[tuple[Any, int, tuple[int, ...]]], torch.Tensor]:
        """One forward over the step's tokens. Returns what to sample, as (sequence, first logits
        row, drafts), and the logits: one row per plain sequence, k + 1 for one verifying k drafts."""
        input_ids: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        rows: list[int] = []  # each sequence's row in self.block_rows
        logit_rows: list[int] = []
        plan = []
        for item in sched.scheduled:
            seq = item.seq
            drafts = item.draft_token_ids
            end = seq.num_computed_tokens + item.num_new_tokens  # drafts included
            # Without a KV cache every step recomputes the sequence from its first token.
            start = seq.num_computed_tokens if self.use_kv_cache else 0
            input_ids.extend(token_slice(seq, start, end - len(drafts)))
            input_ids.extend(drafts)
            query_lens.append(end - start)
            seq_lens.append(end)
            if self.use_kv_cache:
                rows.append(self.block_rows.row(seq.seq_id))
            if end - len(drafts) == seq.num_tokens:  # its last known token is computed: sample after it
                plan.append((seq, len(logit_rows), drafts))
                logit_rows.extend(range(len(input_ids) - len(drafts) - 1, len(input_ids)))
        tables = self.block_rows.gather(rows) if self.use_kv_cache else None
        # A decode step: one token for each sequence (each computes at least one), so no drafts, each sampled.
        if self.graphs is not None and len(input_ids) == len(query_lens) == len(plan) and self.graphs.fits(len(plan)):
            with torch.inference_mode():
                return plan, self.graphs.run(input_ids, seq_lens, tables)
        batch = make_attention_batch(query_lens, seq_lens, tables, self.block_size, self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        # Copied before the forward is queued (a copy to the GPU waits for it); none when every row is kept.
        keep = torch.tensor(logit_rows, device=self.device) if 0 < len(logit_rows) < len(input_ids) else None
        with torch.inference_mode():
            hidden = self.model(ids, batch.positions(), batch, self.kv_cache)
            if not logit_rows:
                return [], hidden.new_empty(0)
            logits = self.model.compute_logits(hidden if keep is None else hidden[keep])
        return plan, logits

    def _retire(self, req: Request, now: float) -> None:
        del self._requests[req.request_id]
        for choice in req.choices:
            self._by_seq.pop(choice.seq.seq_id, None)
            self.block_rows.release(choice.seq.seq_id)
        reasons = {c.finish_reason for c in req.choices}
        self.report.totals["requests_finished"] += 1
        self.report.request_finished(req, "length" if reasons == {"length"} else "stop" if "stop" in reasons else "abort", now)

    # --- figures -------------------------------------------------------------------------------

    def add_observer(self, observer: Any) -> None:
        """observer.on_step(StepStats) after each step; observer.on_request_finished(RequestStats)."""
        self.report.observers.append(observer)

    def applied_quantization(self) -> dict[str, Any] | None:
        """How the served model's weights are quantized (None: full precision)."""
        return applied_quantization(self.quant_stats, self.gen.quantization)

    def info(self) -> dict[str, Any]:
        """The six optimizations as the specs and flags resolved them, plus the model."""
        return engine_info(self)

    def stats(self) -> dict[str, Any]:
        """Live measured figures; nothing here is a constant."""
        return engine_stats(self)


def generate(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             on_step: Callable[[], None] | None = None) -> list[RequestOutput]:
    """Run prompts to completion offline; returns each request's final output (all choices)."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    ids = [f"offline-{i}" for i in range(len(prompts))]
    for rid, prompt, p in zip(ids, prompts, params_list):
        engine.add_request(rid, prompt, p)
    final: dict[str, dict[int, CompletionOutput]] = {rid: {} for rid in ids}
    while engine.has_unfinished():
        for out in engine.step():
            for c in out.outputs:
                final[out.request_id][c.index] = c
        if on_step:
            on_step()
    return [RequestOutput(rid, prompt, [final[rid][i] for i in sorted(final[rid])], True)
            for rid, prompt in zip(ids, prompts)]


def freeze_heap() -> None:
    """Move everything alive now (the model, the KV cache's bookkeeping, imports) out of the
    garbage collector's view: a full collection over that heap pauses a step for 100+ ms. For
    a process's one long-lived engine only (frozen cycles are never collected)."""
    gc.collect()
    gc.freeze()
