"""What the engine reports about itself: running totals and a recent window of steps (EngineStats,
fed once a step, passed on to observers), the live figures `stats` serves, and `info`: the
optimizations as the specs and flags resolved them, plus the model."""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

from vibee.runtime.kv_sizing import format_bytes
from vibee.runtime.outputs import RequestStats, StepStats

if TYPE_CHECKING:
    from vibee.runtime.engine import LLMEngine
    from vibee.runtime.requests import Request

STATS_WINDOW_S = 10.0  # throughput and batch-size figures are averaged over this much recent time


class EngineStats:
    """Totals since start, the recent window, and the observers told of each step and request."""

    def __init__(self) -> None:
        self.observers: list[Any] = []
        self.started = time.monotonic()
        self.window: deque[tuple[float, int, int, int]] = deque()  # (time, prompt tokens, generated, batch)
        self.totals = {"steps": 0, "prompt_tokens": 0, "prefill_tokens_computed": 0, "generation_tokens": 0, "requests_finished": 0,
                       "requests_aborted": 0, "preemptions": 0, "busy_time": 0.0, "batched_seqs": 0}

    def record_step(self, stats: StepStats, computed_prefill: int, now: float) -> None:
        t = self.totals
        t["steps"] += 1
        t["prompt_tokens"] += stats.num_prompt_tokens
        t["prefill_tokens_computed"] += computed_prefill
        t["generation_tokens"] += stats.num_generation_tokens
        t["preemptions"] += stats.num_preemptions
        t["busy_time"] += stats.step_time
        t["batched_seqs"] += stats.batch_size
        self.window.append((now, computed_prefill, stats.num_generation_tokens, stats.batch_size))
        while self.window and now - self.window[0][0] > STATS_WINDOW_S:
            self.window.popleft()
        for obs in self.observers:
            obs.on_step(stats)

    def request_finished(self, req: Request, reason: str, now: float) -> None:
        stats = RequestStats(
            request_id=req.request_id, finish_reason=reason, num_prompt_tokens=len(req.prompt_token_ids),
            num_generation_tokens=sum(len(c.seq.output_token_ids) for c in req.choices),
            queue_time=(req.first_scheduled_time or now) - req.arrival_time,
            time_to_first_token=None if req.first_token_time is None else req.first_token_time - req.arrival_time,
            e2e_latency=now - req.arrival_time, inter_token_latencies=list(req.inter_token_latencies))
        for obs in self.observers:
            obs.on_request_finished(stats)


def applied_quantization(quant_stats, quantization, method: str | None, source: str | None) -> dict[str, Any] | None:
    """How the served model's weights are quantized: the method (rtn or gptq at load, or a checkpoint's gptq or
    awq), bits and group size read off the generated module that holds them (None: full precision). group_size
    -1: one scale per output channel; source: "quantized at load" or "<method> checkpoint"."""
    if quant_stats is None or not quant_stats.layers_quantized:
        return None
    q = quantization
    return {"method": method, "bits": q.BITS, "group_size": q.GROUP_SIZE, "source": source,
            "layers_quantized": quant_stats.layers_quantized}


def engine_info(engine: LLMEngine) -> dict[str, Any]:
    """The optimizations as the specs and flags resolved them, plus the model."""
    e = engine
    cfg = {kind: e.gen.config(kind).model_dump(mode="json") for kind in e.gen.specs}
    mc = e.model_config
    quant = {"enabled": e.config.quant != "none", **cfg["quantization"],
             "weight_bytes_loaded": e.weight_bytes_loaded, "weight_bytes": e.weight_bytes}
    if e.quant_stats is not None:
        quant["quantized"] = _plain(e.quant_stats)
    draft_dir = e.speculator.draft_dir if e.speculator is not None else None
    medusa = e.speculator.medusa if e.speculator is not None else None
    return {
        "model": {"name": e.config.model_name,
                  "path": e.config.model_source,
                  "architecture": mc.architecture,
                  "num_layers": mc.num_layers, "hidden_size": mc.hidden_size, "num_heads": mc.num_heads,
                  "num_kv_heads": mc.num_kv_heads, "head_dim": mc.head_dim, "vocab_size": mc.vocab_size,
                  "tokenizer_vocab_size": e.tokenizer.vocab_size,
                  "all_special_ids": sorted(e.tokenizer.all_special_ids),
                  "max_model_len": e.max_model_len, "device": e.device, "dtype": e.dtype_name,
                  "quantization": e.applied_quantization(),
                  "kv_block_size": e.block_size, "num_kv_blocks": e.num_blocks},
        "generated_from": {"spec_dir": str(e.config.spec_dir or "specs/tri"),
                           "modules": {k: str(path) for k, path in e.gen.sources.items()},
                           "specs": {k: s.path for k, s in e.gen.specs.items()}},
        "kv_cache": {"enabled": e.use_kv_cache, **cfg["kv_cache"], "enable_prefix_caching": e.enable_prefix_caching,
                     "num_blocks": e.num_blocks, "capacity_tokens": e.kv_capacity_tokens,
                     "bytes_per_block": e.kv_bytes_per_block, "bytes_total": e.kv_bytes_per_block * e.num_blocks,
                     # How a GPU's KV cache was sized (None: --num-kv-blocks, or a CPU's fixed budget).
                     "memory_profile": e.memory_profile},
        "cuda_graphs": ({"enabled": True, "batch_sizes": e.graphs.sizes, "num_splits": e.graphs.splits}
                        if e.graphs is not None else
                        {"enabled": False, "why": getattr(e, "graph_error", None) or
                         ("--enforce-eager" if e.config.enforce_eager else "not on a GPU with the KV cache and flash attention")}),
        "flash_attention": {"enabled": e.config.flash_attn,
                            "implementation": "generated flash_attention" if e.config.flash_attn else "generated reference",
                            **cfg["flash_attention"]},
        "continuous_batching": {**cfg["continuous_batch"], "max_num_seqs": e.max_num_seqs,
                                "max_num_batched_tokens": e.max_num_batched_tokens},
        "quantization": quant,
        "speculative_decoding": {"enabled": e.speculative, **cfg["speculative_decode"],
                                 "draft_model": str(draft_dir or "") or None,
                                 "medusa_heads": str(medusa.path) if medusa is not None else None},
        "tensor_parallel": ({"enabled": True, **cfg["tensor_parallel"], **e.ranks.describe(),
                             "num_kv_heads_per_rank": e.num_kv_heads}
                            if e.ranks is not None else {"enabled": False, **cfg["tensor_parallel"]}),
        # The decoder layer's own kernels (add + RMSNorm, SiLU * up, the one-token GEMV): on a GPU with the triton target.
        "decoder": {"kernels": bool(e.gen.decoder.KERNELS) and str(e.device).startswith("cuda"), **cfg["decoder"]},
    }


def engine_stats(engine: LLMEngine) -> dict[str, Any]:
    """Live measured figures; nothing here is a constant."""
    e = engine
    mem = e.block_manager.stats()
    sched = e.scheduler.measured_stats()
    now = time.monotonic()
    started = e.report.started
    span = max(1e-9, min(STATS_WINDOW_S, now - started))
    window = list(e.report.window)
    t = e.report.totals
    used_blocks = e.num_blocks - mem.num_free_blocks
    attention = e.gen.flash_attention if e.config.flash_attn else e.gen.flash_attention_reference
    return {
        "uptime_s": now - started,
        "requests": {"running": sched["num_running"], "waiting": sched["num_waiting"],
                     "finished": t["requests_finished"], "aborted": t["requests_aborted"]},
        "kv_cache": {"num_blocks": e.num_blocks, "used_blocks": used_blocks, "usage": mem.usage,
                     "used_bytes": used_blocks * e.kv_bytes_per_block,
                     "total_bytes": e.num_blocks * e.kv_bytes_per_block,
                     "cached_blocks": mem.num_cached_blocks,
                     "prefix_cache_queries_tokens": mem.prefix_cache_queries * e.block_size,
                     "prefix_cache_hits_tokens": mem.prefix_cache_hits * e.block_size,
                     "prefix_cache_hit_rate": mem.hit_rate},
        "batching": {"steps": t["steps"], "avg_batch_size": t["batched_seqs"] / t["steps"] if t["steps"] else 0.0,
                     "recent_avg_batch_size": (sum(w[3] for w in window) / len(window)) if window else 0.0,
                     "preemptions": t["preemptions"], "last_step_batched_tokens": sched["num_batched_tokens"],
                     # Preemption by swap: blocks' K/V copied to host slots and back, or recomputed
                     # when the slots ran out (fallbacks).
                     "preemption_mode": e.gen.configs.continuous_batch.preemption_mode,
                     "swap_outs": sched["num_swap_outs"], "swap_ins": sched["num_swap_ins"],
                     "swap_fallbacks": sched["num_swap_fallbacks"], "swapped_now": sched["num_swapped"],
                     # Plain decode steps run in rounds on the device (num_scheduler_steps); None: off.
                     "multi_step": e.multi_step.figures() if e.multi_step is not None else None},
        # Prefill rate counts tokens computed (prefix-cache hits are free; preempted ones count again).
        "throughput": {"recent_prefill_tokens_per_s": sum(w[1] for w in window) / span,
                       "recent_generation_tokens_per_s": sum(w[2] for w in window) / span,
                       "prompt_tokens_total": t["prompt_tokens"], "prefill_tokens_computed": t["prefill_tokens_computed"],
                       "generation_tokens_total": t["generation_tokens"],
                       "busy_fraction": t["busy_time"] / max(1e-9, now - started)},
        # Work the attention module did (kernel calls, programs, KV tiles) since the server started.
        "attention": _plain(getattr(attention, "COUNTERS", {})),
        # Constrained requests (response_format, tools) by where their masks ran: token DFAs on the
        # device, or llguidance on the host (grammars that are not regular).
        "structured_output": {f"{path}_requests": n for path, n in e.structured.requests_by_path.items()},
        "speculative_decoding": ({"enabled": True, **e.acceptance.figures(), "gate": e.speculator.gate.figures(),
                                  "speed_gate": e.speed_gate.figures(),
                                  "device_rounds": e.speculator.rounds.figures() if e.speculator.rounds else None}
                                 if e.speculative
                                 else {"enabled": False}),
    }


def _plain(obj: Any) -> Any:
    """A dataclass or namedtuple of figures as a JSON-able dict."""
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _plain(getattr(obj, k)) for k in obj.__dataclass_fields__}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def startup_summary(engine: LLMEngine) -> list[str]:
    """The startup summary: model, precision, KV capacity, and each optimization's state."""
    e = engine
    mc = e.model_config
    lines = [
        f"model      {e.config.model_source} ({mc.architecture}, {mc.num_layers} layers, hidden {mc.hidden_size}, "
        f"{mc.num_heads}/{mc.num_kv_heads} heads) served as '{e.config.model_name}'",
        f"device     {e.device} {e.dtype_name}; max_model_len {e.max_model_len}",
        *([f"ranks      tensor parallel over {e.ranks.size} ranks ({e.ranks.backend}, launched by {e.ranks.launcher}): "
           f"{', '.join(e.ranks.devices)}; {e.num_kv_heads} KV heads per rank, steps run eagerly"]
          if e.ranks is not None else []),
        f"weights    {format_bytes(e.weight_bytes_loaded)}" + (
            f" -> {format_bytes(e.weight_bytes)} after --quant {e.config.quant}" if e.config.quant != "none" else ""),
        f"kv cache   {e.num_blocks} blocks x {e.block_size} tokens = {e.kv_capacity_tokens} tokens "
        f"({format_bytes(e.num_blocks * e.kv_bytes_per_block)})" + ("" if e.use_kv_cache else "  [--no-kv-cache: recompute]"),
    ]
    if e.memory_profile is not None:
        p = e.memory_profile
        lines.append(f"memory     sized at --gpu-memory-utilization {p['utilization']} of {format_bytes(p['total_bytes'])}: "
                     f"{format_bytes(p['in_use_bytes'])} in use before the KV cache (weights {format_bytes(p['weights_bytes'])}), "
                     f"activation peak {format_bytes(p['activation_peak_bytes'])} (profiled), "
                     f"CUDA graph reserve {format_bytes(p['graph_reserve_bytes'])}")
    lines += [
        f"batching   max_num_seqs {e.max_num_seqs}, max_num_batched_tokens {e.max_num_batched_tokens}, "
        f"prefix caching {'on' if e.enable_prefix_caching else 'off'}",
        f"attention  {'generated flash_attention' if e.config.flash_attn else 'generated reference (--no-flash-attn)'}",
        f"modules    {e.gen.source}",
    ]
    return lines
