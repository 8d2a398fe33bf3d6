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
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from vibee.runtime.attention import make_attention_batch
from vibee.runtime.block_table_rows import BlockTableRows
from vibee.runtime.config import DEFAULT_DRAFT_MODEL_DIR, EngineConfig
from vibee.runtime.detokenizer import IncrementalDetokenizer
from vibee.kinds.flash_attention.interface import AttentionFunctions
from vibee.runtime.generated import GeneratedModules, load_generated
from vibee.runtime.loader import load_model_dir
from vibee.runtime.model import build_model
from vibee.runtime.outputs import CompletionOutput, RequestOutput, RequestStats, StepStats, TokenLogprob
from vibee.runtime.sampler import PendingSample, SampleResult, Sampler, SamplingRow
from vibee.runtime.sampling_params import MAX_LOGPROBS, SamplingParams
from vibee.runtime.shapes import SyntheticTokenizer, random_model, shape_config
from vibee.runtime.stop_strings import StopStringMatcher
from vibee.runtime.warmup import warm_prefill

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STATS_WINDOW_S = 10.0  # throughput and batch-size figures are averaged over this much recent time
DRAFT_CONTEXT = 256  # the draft model sees this many latest tokens (RoPE is relative: positions restart at 0)
# Set aside for the decode CUDA graphs, captured after the KV cache: their pool holds the largest
# captured batch's activations (one token per sequence), far below the profiled prefill peak.
CUDA_GRAPH_RESERVE = 256 * 2**20
# An output token recorded before the GPU sampled it: a step is scheduled and launched while the
# previous one runs, so the previous step's tokens are known on the device (the next step reads
# them there) but not yet on the host. The engine puts the real token in its place a step later.
PLACEHOLDER = -1
MAX_VERIFY_ROWS = 256  # the most rows a speculative step's decode graph takes (see _graph_rows)


@dataclass
class _Choice:
    """One choice of a request: its scheduler sequence and the text made from it so far."""

    index: int
    seq: Any  # the generated continuous_batch.Sequence
    detokenizer: IncrementalDetokenizer
    stop: StopStringMatcher
    generator: torch.Generator | None
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    last_token_time: float | None = None
    num_known: int = 0  # output tokens read back from the GPU (any after them are placeholders)
    emitted_tokens: int = 0  # output tokens already reported in a RequestOutput
    emitted_logprobs: int = 0
    reported_text: str = ""  # text already reported in a RequestOutput


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    choices: list[_Choice] = field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    num_cached_tokens: int = 0
    inter_token_latencies: list[float] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        for c in self.choices:  # a loop, not all(genexpr): asked for every request every step
            if c.finish_reason is None:
                return False
        return True


@dataclass
class _Launched:
    """A step on its way: what it runs, and what becomes of its sampled tokens once they are read."""

    sched: Any
    sampling: list[tuple]  # (sequence, first logits row, drafts, request, choice) of each sequence that samples
    before: list[int]  # each one's output length before the step (where its first new token goes)
    pending: PendingSample | None  # the plain rows' tokens on their way to the host
    results: dict[int, list[SampleResult]] | None  # seq_id -> emitted tokens' results, when read at launch
    # seq_id -> its row in `sampled`, for sequences holding a PLACEHOLDER for this step's token
    placeholders: dict[int, int]
    started: float  # perf_counter at launch
    new_prompt_tokens: int
    computed_prefill: int
    prefix_queries: int  # the block manager's counters before the step
    prefix_hits: int


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
        self._setup_speculation(progress)
        # num_blocks: the blocks sequences can hold. CUDA graphs take one more, past them, as the
        # scratch that the padding rows of a captured batch write to.
        self.num_blocks = self._decide_num_blocks(kv_spec)
        scratch = 1 if self._wants_graphs() else 0
        self.kv_cache = (kv.PagedKVCache(self.model_config.num_layers, self.num_blocks + scratch,
                                         self.model_config.num_kv_heads, self.model_config.head_dim, dtype=self.dtype,
                                         device=self.device, block_size=self.block_size) if self.use_kv_cache else None)
        # The last step's sampled tokens, on the device: the next step's decode rows read their
        # input token here (see PLACEHOLDER); CUDA graphs write their rows' argmax here.
        self.sampled = torch.zeros(self._graph_rows(), dtype=torch.long, device=self.device)
        self.graphs = self._capture_graphs() if scratch else None
        if self.graphs is not None and self.device.startswith("cuda"):  # every shape the prefill autotunes on
            warm_prefill(self.model, self.kv_cache, max_tokens=min(self.max_num_batched_tokens, self.max_model_len),
                         block_size=self.block_size, scratch_block=self.num_blocks)
        self.block_manager = kv.BlockManager(self.num_blocks, self.block_size, self.enable_prefix_caching)
        self.block_rows = BlockTableRows(self.block_manager.block_tables)
        self.scheduler = self.gen.continuous_batch.Scheduler(
            self.block_manager, policy=batch_spec.policy, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            enable_chunked_prefill=batch_spec.enable_chunked_prefill,
            long_prefill_token_threshold=batch_spec.long_prefill_token_threshold, watermark=batch_spec.watermark)
        self.sampler = Sampler(seed=config.seed, device=self.device)
        self.eos_token_ids = set(self.model_config.eos_token_ids) | set(self.tokenizer.eos_token_ids)

        self._last_read = 0.0  # perf_counter when the last step's tokens were read
        self._in_flight: _Launched | None = None  # the step whose tokens are not read yet
        self._num_penalized = 0  # requests with penalties: they need every token on the host before a step
        self._requests: dict[str, _Request] = {}
        self._by_seq: dict[int, tuple[_Request, _Choice]] = {}
        self._seq_ids = itertools.count()
        self.observers: list[Any] = []
        self.started = time.monotonic()
        self._window: deque[tuple[float, int, int, int]] = deque()  # (time, prompt tokens, generated, batch)
        self.totals = {"steps": 0, "prompt_tokens": 0, "prefill_tokens_computed": 0, "generation_tokens": 0, "requests_finished": 0,
                       "requests_aborted": 0, "preemptions": 0, "busy_time": 0.0, "batched_seqs": 0}

    # --- sizing --------------------------------------------------------------------------------

    def _decide_num_blocks(self, kv_spec) -> int:
        self.memory_profile: dict[str, Any] | None = None  # filled when sized from a profiled GPU step
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        # Never more than every sequence at full length could use.
        useful = self.max_num_seqs * math.ceil(self.max_model_len / self.block_size) + 1
        if not self.device.startswith("cuda"):  # CPU memory is not the constraint: a fixed budget, no profiling
            blocks = min(useful, int(self.config.cpu_kv_cache_gib * 2**30) // self.kv_bytes_per_block)
            if blocks < 1:
                raise ValueError(f"cpu_kv_cache_gib {self.config.cpu_kv_cache_gib} holds no KV block "
                                 f"({self.kv_bytes_per_block} bytes)")
            return blocks
        utilization = kv_spec.gpu_memory_utilization
        weights = torch.cuda.memory_allocated(self.device)  # what the loaded model(s) hold
        peak = self._profile_activation_peak()
        torch.cuda.empty_cache()
        # After the profile: what it left in use (kernels loaded, library workspaces) counts too.
        free, total = torch.cuda.mem_get_info(self.device)
        # The graphs' scratch block is allocated past num_blocks: reserve it with their pool.
        reserve = CUDA_GRAPH_RESERVE + self.kv_bytes_per_block if self._wants_graphs() else 0
        blocks = kv_blocks_for_budget(total=total, free=free, utilization=utilization, activation_peak=peak,
                                      graph_reserve=reserve, bytes_per_block=self.kv_bytes_per_block, useful=useful,
                                      weights=weights)
        self.memory_profile = {"total_bytes": total, "in_use_bytes": total - free, "weights_bytes": weights,
                               "activation_peak_bytes": peak, "graph_reserve_bytes": reserve,
                               "kv_cache_bytes": blocks * self.kv_bytes_per_block, "utilization": utilization}
        return blocks

    def _profile_activation_peak(self) -> int:
        """Bytes the worst-case step allocates on top of the loaded model (vLLM's profile_run)."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        baseline = torch.cuda.memory_allocated(self.device)
        try:
            self._run_worst_case_step()
        except torch.cuda.OutOfMemoryError as exc:
            raise ValueError(f"the profiling step ({self.max_num_batched_tokens} tokens, {self.max_num_seqs} "
                             "sequences) ran out of GPU memory: lower --max-num-batched-tokens or --max-num-seqs") from exc
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - baseline

    def _run_worst_case_step(self) -> None:
        """The largest step the engine can run, with dummy tokens and no KV cache (the step's own
        K/V): the draft model's proposals, a forward of the most tokens, the logits of the most
        rows and the sampler's heaviest path over them. Nothing it makes outlives it."""
        spec_k = self.num_speculative_tokens if self.speculative else 0
        seq_lens, logit_rows, sampled_rows = worst_case_step(self.max_num_batched_tokens, self.max_num_seqs,
                                                             self.max_model_len, spec_k)
        if self.draft_model is not None:  # drafting runs before the target's forward, each step
            self.drafter.propose([[0] * min(DRAFT_CONTEXT, self.max_model_len)] * self.max_num_seqs, temperature=0.0)
        batch = make_attention_batch(seq_lens, seq_lens, None, self.block_size, self.device)
        ids = torch.zeros(sum(seq_lens), dtype=torch.long, device=self.device)
        with torch.inference_mode():
            hidden = self.model(ids, batch.positions(), batch, None)
            logits = self.model.compute_logits(hidden[torch.arange(logit_rows, device=self.device)])
            del hidden
        # Penalties, top-k with top-p (a full sort), min-p and logprobs: every vocabulary-wide
        # buffer sample() can make. A throwaway Sampler keeps the engine's generator untouched.
        params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                                presence_penalty=0.5, frequency_penalty=0.5, logprobs=MAX_LOGPROBS)
        prompt = [0]
        rows = [SamplingRow(params, prompt, [0]) for _ in range(sampled_rows)]
        Sampler(seed=0).sample(logits[torch.arange(sampled_rows, device=self.device)], rows)

    def _setup_speculation(self, progress: bool) -> None:
        """Drafter and acceptance tracker from the speculative_decode spec, when --speculative."""
        self.speculative = self.config.speculative or self.config.draft_model is not None
        self.drafter = None
        self.draft_model = None
        if not self.speculative:
            return
        spec = self.gen.configs.speculative_decode
        sd = self.gen.speculative_decode
        self.num_speculative_tokens = spec.num_speculative_tokens
        if spec.method == "ngram":
            self.drafter = sd.NgramDrafter(spec.num_speculative_tokens, spec.ngram.min_n, spec.ngram.max_n)
        else:
            builtin = self.config.model is None and self.config.shape is None
            draft_dir = self.config.draft_model or (DEFAULT_DRAFT_MODEL_DIR if builtin else None)
            if draft_dir is None:
                raise ValueError("speculative method draft_model needs --draft-model DIR (a model with the same tokenizer)")
            self.draft_dir = draft_dir
            loaded = load_model_dir(draft_dir, dtype=self.dtype, device=self.device, progress=progress)
            if loaded.config.vocab_size != self.model_config.vocab_size:
                raise ValueError(f"the draft model {draft_dir} has a vocabulary of {loaded.config.vocab_size} tokens, "
                                 f"the target {self.model_config.vocab_size}; they must share a tokenizer")
            self.draft_model = build_model(loaded, self.gen, flash_attn=self.config.flash_attn).eval()
            self.drafter = sd.DraftModelDrafter(self._draft_logits, spec.num_speculative_tokens)
        self.acceptance = sd.AcceptanceTracker(spec.num_speculative_tokens)

    def _draft_logits(self, contexts: list[list[int]]) -> torch.Tensor:
        """Next-token logits of the draft model for each context (its latest DRAFT_CONTEXT tokens),
        recomputed without a KV cache: the draft is small and contexts are short."""
        windows = [c[-DRAFT_CONTEXT:] for c in contexts]
        lens = [len(w) for w in windows]
        batch = make_attention_batch(lens, lens, None, self.block_size, self.device)
        ids = torch.tensor([t for w in windows for t in w], dtype=torch.long, device=self.device)
        last = torch.tensor(lens, device=self.device).cumsum(0) - 1
        with torch.inference_mode():
            hidden = self.draft_model(ids, batch.positions(), batch, None)
            return self.draft_model.compute_logits(hidden[last])

    def _propose_drafts(self) -> None:
        """Give each decoding sequence its draft tokens for this step (the scheduler verifies them)."""
        running = self.scheduler.running
        for seq in running:
            seq.draft_token_ids = []
        spec = self.gen.config("speculative_decode")
        if not self.gen.speculative_decode.speculation_enabled(len(running), spec.disable_by_batch_size):
            return
        candidates = []
        for seq in running:
            req, _ = self._by_seq[seq.seq_id]
            room = seq.max_tokens - len(seq.output_token_ids) - 1
            # Penalties change the target distribution token by token; such requests decode plainly.
            if seq.output_token_ids and seq.num_tokens - seq.num_computed_tokens == 1 and room > 0 \
                    and not req.params.has_penalties:
                candidates.append((seq, room))
        if not candidates:
            return
        if self.draft_model is None:
            for seq, room in candidates:
                seq.draft_token_ids = self.drafter.propose(seq.all_token_ids)[:room]
        else:
            # Greedy drafts: q is one-hot, which keeps rejection sampling exact at any temperature.
            tokens, _ = self.drafter.propose([seq.all_token_ids for seq, _ in candidates], temperature=0.0)
            for (seq, room), row in zip(candidates, tokens.tolist()):
                seq.draft_token_ids = row[:room]

    def _verify(self, seq, drafts: tuple[int, ...], logits: torch.Tensor, targets: list[int] | None) -> list[SampleResult]:
        """What a speculative step emits for one sequence: accepted drafts, then one token from
        the target (logits [k+1, V] at the decode token and each draft; targets: their argmax,
        when a CUDA graph computed it)."""
        req, choice = self._by_seq[seq.seq_id]
        sd = self.gen.speculative_decode
        greedy = req.params.is_greedy or self.gen.configs.speculative_decode.verification == "greedy"
        if greedy and targets is not None:
            tokens = sd.greedy_accept(list(drafts), targets)
            self.acceptance.update(len(drafts), len(tokens) - 1)
            if req.params.logprobs is None:
                return [SampleResult(t, None, None) for t in tokens]
            return self.sampler.results_for(logits[: len(tokens)], torch.tensor(tokens, device=logits.device),
                                            [req.params] * len(tokens))
        draft = torch.tensor([drafts], dtype=torch.long, device=logits.device)
        if greedy:
            emitted, accepted = sd.greedy_verify(draft, logits[None])
        else:
            probs = self.sampler.probabilities(logits, req.params)
            generator = choice.generator or self.sampler.shared_generator(logits.device)
            emitted, accepted = sd.rejection_sample(draft, None, probs[None], generator)
        self.acceptance.update(len(drafts), accepted)
        tokens = emitted[0]
        rows = logits[: len(tokens)]
        return self.sampler.results_for(rows, torch.tensor(tokens, device=logits.device), [req.params] * len(tokens))

    def _graph_rows(self) -> int:
        """Rows of the largest decode graph: a row per sequence, or with speculation k + 1 per
        sequence it may draft for (at most MAX_VERIFY_ROWS: the graphs' pool must stay within
        the memory reserved for it)."""
        rows = self.max_num_seqs
        if self.speculative:
            spec = self.gen.configs.speculative_decode
            drafting = min(self.max_num_seqs, spec.disable_by_batch_size or self.max_num_seqs)
            rows = max(rows, min(drafting * (spec.num_speculative_tokens + 1), MAX_VERIFY_ROWS))
        return rows

    def _wants_graphs(self) -> bool:
        return (self.device.startswith("cuda") and self.use_kv_cache and self.config.flash_attn
                and not self.config.enforce_eager)

    def _capture_graphs(self):
        """CUDA graphs of decode steps up to max_num_seqs; None (eager) if the step can't be captured."""
        import logging

        from vibee.runtime.cuda_graphs import DecodeGraphs

        fa = self.gen.flash_attention
        graphs = DecodeGraphs(self.model, self.kv_cache, max_batch=self._graph_rows(), max_model_len=self.max_model_len,
                              block_size=self.block_size, padding_slot=self.num_blocks * self.block_size,
                              num_splits=fa.num_splits_for(self.max_model_len), sampled=self.sampled)
        try:
            graphs.capture()
        except Exception as exc:  # a kernel that syncs with the host can't be captured: run eagerly
            logging.getLogger("vibee.engine").warning("decode steps run eagerly: CUDA graph capture failed: %s", exc)
            self.graph_error = str(exc)
            return None
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
        req = _Request(request_id, list(prompt_token_ids), params, arrival_time or time.monotonic())
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        for index in range(params.n):
            seq = self.gen.continuous_batch.Sequence(next(self._seq_ids), list(prompt_token_ids), params.max_tokens,
                                                     arrival_time=req.arrival_time, stop_token_ids=frozenset(stop_ids))
            choice = _Choice(index, seq, IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens),
                             StopStringMatcher(list(params.stop), params.include_stop_str_in_output),
                             self._generator(params.seed, index),
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
        self._num_penalized += params.has_penalties

    def _generator(self, seed: int | None, index: int) -> torch.Generator | None:
        if seed is None:
            return None
        g = torch.Generator(device=self.device)
        g.manual_seed((seed * 1_000_003 + index) % 2**63 if index else seed)
        return g

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Drop a request wherever it is; its KV blocks are freed now (a step in flight that
        still writes to them is ordered before any later owner's). Returns its final output:
        the tokens read back so far; one sampled in the step in flight is dropped."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        self._num_penalized -= req.params.has_penalties
        changed = []
        for choice in req.choices:
            self.scheduler.abort(choice.seq.seq_id)
            self._by_seq.pop(choice.seq.seq_id, None)
            self.block_rows.release(choice.seq.seq_id)
            if choice.finish_reason is None:
                choice.finish_reason = "abort"
                changed.append(choice)
        self.totals["requests_aborted"] += 1
        self._request_finished(req, "abort", time.monotonic())
        if not self._requests and self._in_flight is not None:  # nothing left to report it to: read and recorded
            launched, self._in_flight = self._in_flight, None
            self._resolve(launched)
        return RequestOutput(req.request_id, req.prompt_token_ids, [self._output(c) for c in changed], True,
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
        """Schedule and launch the next step, then read the previous one's tokens while the GPU
        runs it, and report every request that changed. Outputs come a step after their tokens
        were sampled; a step whose inputs need the previous tokens on the host (speculative
        drafts, penalties) waits for them first."""
        outputs: list[RequestOutput] = []
        previous, self._in_flight = self._in_flight, None
        if previous is not None and not self._can_overlap():
            outputs += self._resolve(previous)
            previous = None
        launched = self._launch(previous)
        if previous is not None:
            outputs += self._resolve(previous)
        if launched is not None:
            if launched.placeholders:
                self._in_flight = launched
            else:
                outputs += self._resolve(launched)
        return outputs

    def _can_overlap(self) -> bool:
        """Whether the next step may be scheduled before the last one's tokens are on the host."""
        return not self.speculative and self._num_penalized == 0

    def _launch(self, previous: _Launched | None) -> _Launched | None:
        """Schedule a step, queue its forward and sampling on the device, and advance the
        scheduler: with the sampled tokens when they must be read now, else with placeholders."""
        t0 = time.perf_counter()
        queries0, hits0 = self.block_manager.prefix_cache_queries, self.block_manager.prefix_cache_hits
        if self.speculative:
            self._propose_drafts()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return None
        now = time.monotonic()
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

        plan, logits, rows_argmax = self._run_model(sched, previous.placeholders if previous is not None else {})
        # (sequence, first logits row, drafts, request, choice) of each sequence that samples.
        sampling = [(seq, row, drafts, *self._by_seq[seq.seq_id]) for seq, row, drafts in plan]
        # Plain rows sample one token; speculative rows verify their drafts (k + 1 logits each).
        plain = [s for s in sampling if not s[2]]
        pending = None
        if plain:
            params = [req.params for _, _, _, req, _ in plain]
            # Every row plain: the logits are theirs, in order; no gather (its index copy waits for the GPU).
            x = logits if len(plain) == len(logits) else logits[[row for _, row, _, _, _ in plain]]
            if rows_argmax and len(plain) == len(logits) and all(p.is_greedy and not p.has_penalties for p in params):
                # The graph's argmax is what sample() would pick: only the copies are queued.
                pending = self.sampler.launch_for(x, self.sampled[: len(plain)], params)
            else:
                pending = self.sampler.launch(x, [SamplingRow(req.params, req.prompt_token_ids, seq.output_token_ids,
                                                              choice.generator) for seq, _, _, req, choice in plain])
                self.sampled[: len(plain)].copy_(pending.tokens)  # where the next step reads them
        before = [len(s[0].output_token_ids) for s in sampling]
        launched = _Launched(sched, sampling, before, pending, None, {}, t0, new_prompt_tokens, computed_prefill,
                             queries0, hits0)
        if pending is not None and len(plain) == len(sampling) and self._can_overlap():
            launched.placeholders = {s[0].seq_id: j for j, s in enumerate(plain)}
            self.scheduler.update(sched, dict.fromkeys(launched.placeholders, PLACEHOLDER))
            return launched
        # Read now: the drafts' verification decides what the step emitted.
        plain_results = self.sampler.collect(pending) if pending is not None else []
        results = {s[0].seq_id: [r] for s, r in zip(plain, plain_results)}
        sampled: dict[int, Any] = {seq_id: rs[0].token_id for seq_id, rs in results.items()}
        # A graph's argmax of every row: greedy verification needs no logits on the host.
        targets = self.sampled[: len(logits)].tolist() if rows_argmax and len(plain) < len(sampling) else None
        for seq, row, drafts, _, _ in sampling:
            if drafts:
                results[seq.seq_id] = self._verify(seq, drafts, logits[row: row + len(drafts) + 1],
                                                   None if targets is None else targets[row: row + len(drafts) + 1])
                sampled[seq.seq_id] = [r.token_id for r in results[seq.seq_id]]
        launched.results = results
        self.scheduler.update(sched, sampled)
        return launched

    def _resolve(self, launched: _Launched) -> list[RequestOutput]:
        """A launched step's tokens, read back: placeholders replaced, stop tokens and strings
        applied, text made, outputs reported, finished requests retired, the step recorded."""
        placeholders = launched.placeholders
        if placeholders:
            read = self.sampler.collect(launched.pending)
        now = time.monotonic()
        changed: dict[str, tuple[_Request, list[_Choice]]] = {}
        num_generated = 0
        for (seq, _, _, req, choice), start in zip(launched.sampling, launched.before):
            if choice.finish_reason is not None or self._requests.get(req.request_id) is not req:
                continue  # it ended (a stop, an abort) while this step ran: its token is dropped
            if placeholders:
                result = read[placeholders[seq.seq_id]]
                results = [result]
                seq.output_token_ids[start] = result.token_id
                self.block_manager.set_token(seq.seq_id, len(seq.prompt_token_ids) + start, result.token_id)
                if result.token_id in seq.stop_token_ids:
                    self._stop_token_at(seq, start)
            else:
                results = launched.results[seq.seq_id]
            for i, result in enumerate(results[: len(seq.output_token_ids) - start]):
                num_generated += 1
                # The scheduler's status is about the sequence's last token: only that one finishes it.
                last = start + i == len(seq.output_token_ids) - 1
                if self._accept_token(req, choice, seq.output_token_ids[start + i], result, now, last=last):
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
            outputs.append(RequestOutput(req.request_id, req.prompt_token_ids, [self._output(c) for c in choices],
                                         finished, req.num_cached_tokens))
            if finished:
                self._retire(req, now)

        step_time = time.perf_counter() - max(launched.started, self._last_read)
        self._last_read = time.perf_counter()
        stats = StepStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=1.0 - self.block_manager.num_free_blocks() / self.num_blocks,
            num_preemptions=len(launched.sched.preempted),
            prefix_cache_queries=(self.block_manager.prefix_cache_queries - launched.prefix_queries) * self.block_size,
            prefix_cache_hits=(self.block_manager.prefix_cache_hits - launched.prefix_hits) * self.block_size,
            num_prompt_tokens=launched.new_prompt_tokens, num_generation_tokens=num_generated,
            batch_size=len(launched.sched.scheduled), step_time=step_time)
        self._record_step(stats, launched.computed_prefill, now)
        return outputs

    def _stop_token_at(self, seq, index: int) -> None:
        """The token read back at output index is a stop token, which the scheduler saw as a
        placeholder: end the sequence there, dropping the next step's placeholder after it."""
        del seq.output_token_ids[index + 1:]
        if self.scheduler.finish_stopped(seq.seq_id) is None:
            # The placeholder after it had reached max_tokens: finished, blocks freed already.
            seq.status = type(seq.status).FINISHED_STOPPED

    def _run_model(self, sched, placeholders: dict[int, int]) -> tuple[list[tuple[Any, int, tuple[int, ...]]], torch.Tensor, bool]:
        """One forward over the step's tokens. Returns what to sample, as (sequence, first logits
        row, drafts), the logits (one row per plain sequence, k + 1 for one verifying k drafts)
        and whether self.sampled[:rows] holds each logits row's argmax (a CUDA graph ran).
        placeholders: seq_id -> the row of `sampled` holding the token its PLACEHOLDER stands for."""
        input_ids: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        rows: list[int] = []  # each sequence's row in self.block_rows
        logit_rows: list[int] = []
        sources: list[tuple[int, int]] = []  # (token index in input_ids, row of sampled) of each placeholder
        plan = []
        for item in sched.scheduled:
            seq = item.seq
            drafts = item.draft_token_ids
            end = seq.num_computed_tokens + item.num_new_tokens  # drafts included
            # Without a KV cache every step recomputes the sequence from its first token.
            start = seq.num_computed_tokens if self.use_kv_cache else 0
            input_ids.extend(_token_slice(seq, start, end - len(drafts)))
            if end - len(drafts) == seq.num_tokens and seq.seq_id in placeholders:  # its last token is one
                sources.append((len(input_ids) - 1, placeholders[seq.seq_id]))
            input_ids.extend(drafts)
            query_lens.append(end - start)
            seq_lens.append(end)
            if self.use_kv_cache:
                rows.append(self.block_rows.row(seq.seq_id))
            if end - len(drafts) == seq.num_tokens:  # its last known token is computed: sample after it
                plan.append((seq, len(logit_rows), drafts))
                logit_rows.extend(range(len(input_ids) - len(drafts) - 1, len(input_ids)))
        tables = self.block_rows.gather(rows) if self.use_kv_cache else None
        if self.graphs is not None and tables is not None and len(logit_rows) == len(input_ids) \
                and len(plan) == len(query_lens) and self.graphs.fits(len(input_ids)):
            # A decode step: each sequence computes its last token and its drafts (if any), all
            # sampled; as graph rows, a sequence's k + 1 tokens are k + 1 one-token rows.
            if len(input_ids) > len(query_lens):  # drafts: row r is token r of its sequence's k + 1
                q = np.asarray(query_lens)
                first = np.repeat(np.cumsum(q) - q, q)  # each row's sequence's first row
                lens = np.repeat(np.asarray(seq_lens) - q, q) + np.arange(len(input_ids)) - first + 1
                tables = tables[np.repeat(np.arange(len(q)), q)]
            else:
                lens = seq_lens
            token_sources = None
            if sources:
                token_sources = [-1] * len(input_ids)
                for index, row in sources:
                    token_sources[index] = row
            with torch.inference_mode():
                return plan, self.graphs.run(input_ids, lens, tables, token_sources), True
        batch = make_attention_batch(query_lens, seq_lens, tables, self.block_size, self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        if sources:  # placeholders: the tokens the last step left on the device
            at, row = zip(*sources)
            ids[torch.tensor(at, device=self.device)] = self.sampled[torch.tensor(row, device=self.device)]
        # Copied before the forward is queued (a copy to the GPU waits for it); none when every row is kept.
        keep = torch.tensor(logit_rows, device=self.device) if 0 < len(logit_rows) < len(input_ids) else None
        with torch.inference_mode():
            hidden = self.model(ids, batch.positions(), batch, self.kv_cache)
            if not logit_rows:
                return [], hidden.new_empty(0), False
            logits = self.model.compute_logits(hidden if keep is None else hidden[keep])
        return plan, logits, False

    def _accept_token(self, req: _Request, choice: _Choice, token: int, result: SampleResult, now: float,
                      last: bool = True) -> bool:
        """Turn one emitted token into text, logprobs and finish state for its choice. `last`: the
        final token this step emitted for it (only then does the scheduler's status apply).
        Returns True when a stop string ended the choice at this token."""
        seq = choice.seq
        choice.num_known += 1
        if choice.last_token_time is None:
            if req.first_token_time is None:
                req.first_token_time = now
        else:
            req.inter_token_latencies.append(now - choice.last_token_time)
        choice.last_token_time = now
        if choice.logprobs is not None:
            choice.logprobs.append(TokenLogprob(token, float(result.logprob), list(result.top_logprobs or [])))
        status = seq.status.name if last else "RUNNING"
        if status == "FINISHED_STOPPED":  # a stop token or EOS: its text is not part of the output
            stopped = self._end_text(choice)
            choice.finish_reason = "stop"
            choice.stop_reason = stopped if stopped is not None else (token if token in req.params.stop_token_ids else None)
            return False
        emit, stopped = choice.stop.feed(choice.detokenizer.add(token))
        choice.text += emit
        if stopped is None and status == "FINISHED_LENGTH":
            stopped = self._end_text(choice)
            choice.finish_reason = "length"
        if stopped is not None:
            if seq.status.name == "RUNNING":
                self.scheduler.finish_stopped(seq.seq_id)
            choice.finish_reason, choice.stop_reason = "stop", stopped
            return True
        return False

    @staticmethod
    def _end_text(choice: _Choice) -> str | None:
        """Generation ended: release what the detokenizer (an unfinished character) and the stop
        matcher (a possible stop string's start) held back. Returns a stop string completed by it."""
        emit, stopped = choice.stop.feed(choice.detokenizer.flush())
        choice.text += emit
        if stopped is None:
            choice.text += choice.stop.flush()
            stopped = choice.stop.stopped
        return stopped

    def _output(self, choice: _Choice) -> CompletionOutput:
        """The choice's state with what is new since its last report (its token list is shared,
        not copied: see CompletionOutput)."""
        n = choice.num_known  # not the placeholder of a step in flight
        tokens = choice.seq.output_token_ids
        delta_tokens = tokens[choice.emitted_tokens: n]
        delta_text = choice.text[len(choice.reported_text):]
        choice.reported_text = choice.text
        choice.emitted_tokens = n
        delta_logprobs = None
        if choice.logprobs is not None:
            delta_logprobs = choice.logprobs[choice.emitted_logprobs:]
            choice.emitted_logprobs = len(choice.logprobs)
        return CompletionOutput(choice.index, choice.text, tokens, delta_text, delta_tokens, delta_logprobs,
                                choice.logprobs, choice.finish_reason, choice.stop_reason, n)

    def _retire(self, req: _Request, now: float) -> None:
        del self._requests[req.request_id]
        self._num_penalized -= req.params.has_penalties
        for choice in req.choices:
            self._by_seq.pop(choice.seq.seq_id, None)
            self.block_rows.release(choice.seq.seq_id)
        reasons = {c.finish_reason for c in req.choices}
        self.totals["requests_finished"] += 1
        self._request_finished(req, "length" if reasons == {"length"} else "stop" if "stop" in reasons else "abort", now)

    def _request_finished(self, req: _Request, reason: str, now: float) -> None:
        stats = RequestStats(
            request_id=req.request_id, finish_reason=reason, num_prompt_tokens=len(req.prompt_token_ids),
            num_generation_tokens=sum(len(c.seq.output_token_ids) for c in req.choices),
            queue_time=(req.first_scheduled_time or now) - req.arrival_time,
            time_to_first_token=None if req.first_token_time is None else req.first_token_time - req.arrival_time,
            e2e_latency=now - req.arrival_time, inter_token_latencies=list(req.inter_token_latencies))
        for obs in self.observers:
            obs.on_request_finished(stats)

    # --- figures -------------------------------------------------------------------------------

    def add_observer(self, observer: Any) -> None:
        """observer.on_step(StepStats) after each step; observer.on_request_finished(RequestStats)."""
        self.observers.append(observer)

    def _record_step(self, stats: StepStats, computed_prefill: int, now: float) -> None:
        t = self.totals
        t["steps"] += 1
        t["prompt_tokens"] += stats.num_prompt_tokens
        t["prefill_tokens_computed"] += computed_prefill
        t["generation_tokens"] += stats.num_generation_tokens
        t["preemptions"] += stats.num_preemptions
        t["busy_time"] += stats.step_time
        t["batched_seqs"] += stats.batch_size
        self._window.append((now, computed_prefill, stats.num_generation_tokens, stats.batch_size))
        while self._window and now - self._window[0][0] > STATS_WINDOW_S:
            self._window.popleft()
        for obs in self.observers:
            obs.on_step(stats)

    def _attention_module(self) -> AttentionFunctions:
        return self.gen.flash_attention if self.config.flash_attn else self.gen.flash_attention_reference

    def applied_quantization(self) -> dict[str, Any] | None:
        """How the served model's weights are quantized (round to nearest), read off the generated module that did it
        (None: full precision). group_size -1: one scale per output channel."""
        if self.quant_stats is None or not self.quant_stats.layers_quantized:
            return None
        q = self.gen.quantization
        return {"method": "rtn", "bits": q.BITS, "group_size": q.GROUP_SIZE,
                "layers_quantized": self.quant_stats.layers_quantized}

    def info(self) -> dict[str, Any]:
        """The six optimizations as the specs and flags resolved them, plus the model."""
        cfg = {kind: self.gen.config(kind).model_dump(mode="json") for kind in self.gen.specs}
        mc = self.model_config
        quant = {"enabled": self.config.quant != "none", **cfg["quantization"],
                 "weight_bytes_loaded": self.weight_bytes_loaded, "weight_bytes": self.weight_bytes}
        if self.quant_stats is not None:
            quant["quantized"] = _plain(self.quant_stats)
        return {
            "model": {"name": self.config.model_name,
                      "path": self.config.model_source,
                      "architecture": mc.architecture,
                      "num_layers": mc.num_layers, "hidden_size": mc.hidden_size, "num_heads": mc.num_heads,
                      "num_kv_heads": mc.num_kv_heads, "head_dim": mc.head_dim, "vocab_size": mc.vocab_size,
                      "tokenizer_vocab_size": self.tokenizer.vocab_size,
                      "all_special_ids": sorted(self.tokenizer.all_special_ids),
                      "max_model_len": self.max_model_len, "device": self.device, "dtype": self.dtype_name,
                      "quantization": self.applied_quantization(),
                      "kv_block_size": self.block_size, "num_kv_blocks": self.num_blocks},
            "generated_from": {"spec_dir": str(self.config.spec_dir or "specs/tri"),
                               "modules": {k: str(path) for k, path in self.gen.sources.items()},
                               "specs": {k: s.path for k, s in self.gen.specs.items()}},
            "kv_cache": {"enabled": self.use_kv_cache, **cfg["kv_cache"], "enable_prefix_caching": self.enable_prefix_caching,
                         "num_blocks": self.num_blocks, "capacity_tokens": self.kv_capacity_tokens,
                         "bytes_per_block": self.kv_bytes_per_block, "bytes_total": self.kv_bytes_per_block * self.num_blocks,
                         # How a GPU's KV cache was sized (None: --num-kv-blocks, or a CPU's fixed budget).
                         "memory_profile": self.memory_profile},
            "cuda_graphs": ({"enabled": True, "batch_sizes": self.graphs.sizes, "num_splits": self.graphs.splits}
                            if self.graphs is not None else
                            {"enabled": False, "why": getattr(self, "graph_error", None) or
                             ("--enforce-eager" if self.config.enforce_eager else "not on a GPU with the KV cache and flash attention")}),
            "flash_attention": {"enabled": self.config.flash_attn,
                                "implementation": "generated flash_attention" if self.config.flash_attn else "generated reference",
                                **cfg["flash_attention"]},
            "continuous_batching": {**cfg["continuous_batch"], "max_num_seqs": self.max_num_seqs,
                                    "max_num_batched_tokens": self.max_num_batched_tokens},
            "quantization": quant,
            "speculative_decoding": {"enabled": self.speculative, **cfg["speculative_decode"],
                                     "draft_model": str(getattr(self, "draft_dir", "")) or None},
            "tensor_parallel": {"enabled": False, **cfg["tensor_parallel"], "tp_size": 1},  # serving runs one rank
        }

    def stats(self) -> dict[str, Any]:
        """Live measured figures; nothing here is a constant."""
        mem = self.block_manager.stats()
        sched = self.scheduler.measured_stats()
        now = time.monotonic()
        span = max(1e-9, min(STATS_WINDOW_S, now - self.started))
        window = list(self._window)
        t = self.totals
        used_blocks = self.num_blocks - mem.num_free_blocks
        return {
            "uptime_s": now - self.started,
            "requests": {"running": sched["num_running"], "waiting": sched["num_waiting"],
                         "finished": t["requests_finished"], "aborted": t["requests_aborted"]},
            "kv_cache": {"num_blocks": self.num_blocks, "used_blocks": used_blocks, "usage": mem.usage,
                         "used_bytes": used_blocks * self.kv_bytes_per_block,
                         "total_bytes": self.num_blocks * self.kv_bytes_per_block,
                         "cached_blocks": mem.num_cached_blocks,
                         "prefix_cache_queries_tokens": mem.prefix_cache_queries * self.block_size,
                         "prefix_cache_hits_tokens": mem.prefix_cache_hits * self.block_size,
                         "prefix_cache_hit_rate": mem.hit_rate},
            "batching": {"steps": t["steps"], "avg_batch_size": t["batched_seqs"] / t["steps"] if t["steps"] else 0.0,
                         "recent_avg_batch_size": (sum(w[3] for w in window) / len(window)) if window else 0.0,
                         "preemptions": t["preemptions"], "last_step_batched_tokens": sched["num_batched_tokens"]},
            # Prefill rate counts tokens computed (prefix-cache hits are free; preempted ones count again).
            "throughput": {"recent_prefill_tokens_per_s": sum(w[1] for w in window) / span,
                           "recent_generation_tokens_per_s": sum(w[2] for w in window) / span,
                           "prompt_tokens_total": t["prompt_tokens"], "prefill_tokens_computed": t["prefill_tokens_computed"],
                           "generation_tokens_total": t["generation_tokens"],
                           "busy_fraction": t["busy_time"] / max(1e-9, now - self.started)},
            # Work the attention module did (kernel calls, programs, KV tiles) since the server started.
            "attention": _plain(getattr(self._attention_module(), "COUNTERS", {})),
            "speculative_decoding": ({"enabled": True, **self.acceptance.figures()} if self.speculative
                                     else {"enabled": False}),
        }


def worst_case_step(max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int,
                    num_speculative_tokens: int = 0) -> tuple[list[int], int, int]:
    """The largest step's shape: (sequence lengths, logits rows, sampled rows). As many tokens as a
    step may hold, in sequences no longer than max_model_len and no more of them than max_num_seqs;
    logits for the last token of every running sequence, k + 1 of them when it verifies k drafts
    (the drafts count as step tokens); the sampler takes one row per sequence."""
    tokens = min(max_num_batched_tokens, max_num_seqs * max_model_len)
    seq_lens = [min(max_model_len, tokens - start) for start in range(0, tokens, max_model_len)]
    logit_rows = min(tokens, max_num_seqs * (num_speculative_tokens + 1))
    return seq_lens, logit_rows, min(logit_rows, max_num_seqs)


def kv_blocks_for_budget(*, total: int, free: int, utilization: float, activation_peak: int, graph_reserve: int,
                         bytes_per_block: int, useful: int, weights: int | None = None) -> int:
    """KV blocks that fit in total * utilization of the GPU once what is in use now (total - free:
    weights, CUDA context, other processes), the profiled activation peak and the CUDA-graph
    reserve are set aside; never more than `useful`. weights only explains the error."""
    in_use = total - free
    budget = int(total * utilization) - in_use - activation_peak - graph_reserve
    blocks = min(useful, budget // bytes_per_block)
    if blocks < 1:
        held = f"{format_bytes(in_use)} in use before the KV cache" + (
            f" (weights {format_bytes(weights)}, the rest CUDA context and other processes)" if weights is not None else "")
        raise ValueError(
            f"no memory is left for the KV cache: --gpu-memory-utilization {utilization} allows "
            f"{format_bytes(int(total * utilization))} of {format_bytes(total)}; {held}, "
            f"{format_bytes(activation_peak)} profiled activation peak, {format_bytes(graph_reserve)} CUDA graph "
            f"reserve; one KV block takes {format_bytes(bytes_per_block)}. Raise --gpu-memory-utilization, lower "
            f"--max-num-batched-tokens or --max-num-seqs{', pass --enforce-eager' if graph_reserve else ''}, "
            "or use a smaller model or --quant")
    return blocks


def format_bytes(n: int) -> str:
    """Bytes as people read them: GiB, MiB, or plain bytes below that."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _token_slice(seq, start: int, stop: int) -> list[int]:
    """seq.all_token_ids[start:stop] without building the whole list (a decode step needs one token)."""
    prompt, n = seq.prompt_token_ids, len(seq.prompt_token_ids)
    if start >= n:
        return seq.output_token_ids[start - n: stop - n]
    return prompt[start:stop] + seq.output_token_ids[: max(0, stop - n)]


def _plain(obj: Any) -> Any:
    """A dataclass or namedtuple of figures as a JSON-able dict."""
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _plain(getattr(obj, k)) for k in obj.__dataclass_fields__}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


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
