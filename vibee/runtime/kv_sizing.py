"""How many KV blocks fit: a fixed budget on the CPU, or on a GPU what is left once the loaded
model(s), the profiled worst-case step and the CUDA-graph reserve are set aside (vLLM's profile_run)."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from vibee.runtime.attention import make_attention_batch
from vibee.runtime.sampler import Sampler, SamplingRow
from vibee.runtime.sampling_params import MAX_LOGPROBS, SamplingParams

# Set aside for the decode CUDA graphs, captured after the KV cache: their pool holds the largest
# captured batch's activations (one token per sequence), far below the profiled prefill peak.
CUDA_GRAPH_RESERVE = 256 * 2**20


def paged_kv_cache(kv: Any, model_config: Any, num_kv_heads: int, num_blocks: int, *, dtype: torch.dtype, device: str,
                   block_size: int) -> Any:
    """The generated kv_cache's PagedKVCache for a model's layers and this rank's KV heads."""
    return kv.PagedKVCache(model_config.num_layers, num_blocks, num_kv_heads, model_config.head_dim, dtype=dtype,
                           device=device, block_size=block_size)


def host_kv_swap(kv: Any, batch_spec: Any, kv_cache: Any, bytes_per_block: int) -> Any:
    """Host slots for preempted sequences' KV (preemption_mode swap, sized by swap_space_gib), else None."""
    if batch_spec.preemption_mode != "swap" or kv_cache is None:
        return None
    return kv.HostKVSwap(kv_cache, kv.HostKVSwap.num_slots_for(int(batch_spec.swap_space_gib * 2**30), bytes_per_block))


def decide_num_blocks(*, config, kv_spec, device: str, bytes_per_block: int, max_num_seqs: int,
                      max_num_batched_tokens: int, max_model_len: int,
                      block_size: int, wants_graphs: bool,
                      run_worst_case_step: Callable[[], None]) -> tuple[int, dict[str, Any] | None]:
    """(blocks sequences can hold, the memory profile it was sized from or None)."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks, None
    # Never more than every sequence at full length could use.
    useful = max_num_seqs * math.ceil(max_model_len / block_size) + 1
    if not device.startswith("cuda"):  # CPU memory is not the constraint: a fixed budget, no profiling
        blocks = min(useful, int(config.cpu_kv_cache_gib * 2**30) // bytes_per_block)
        if blocks < 1:
            raise ValueError(f"cpu_kv_cache_gib {config.cpu_kv_cache_gib} holds no KV block "
                             f"({bytes_per_block} bytes)")
        return blocks, None
    utilization = kv_spec.gpu_memory_utilization
    weights = torch.cuda.memory_allocated(device)  # what the loaded model(s) hold
    peak = profile_activation_peak(device, run_worst_case_step, max_num_batched_tokens, max_num_seqs)
    torch.cuda.empty_cache()
    # After the profile: what it left in use (kernels loaded, library workspaces) counts too.
    free, total = torch.cuda.mem_get_info(device)
    # The graphs' scratch block is allocated past num_blocks: reserve it with their pool.
    reserve = CUDA_GRAPH_RESERVE + bytes_per_block if wants_graphs else 0
    blocks = kv_blocks_for_budget(total=total, free=free, utilization=utilization, activation_peak=peak,
                                  graph_reserve=reserve, bytes_per_block=bytes_per_block, useful=useful,
                                  weights=weights)
    profile = {"total_bytes": total, "in_use_bytes": total - free, "weights_bytes": weights,
               "activation_peak_bytes": peak, "graph_reserve_bytes": reserve,
               "kv_cache_bytes": blocks * bytes_per_block, "utilization": utilization}
    return blocks, profile


def profile_activation_peak(device: str, run_worst_case_step: Callable[[], None], max_num_batched_tokens: int,
                            max_num_seqs: int) -> int:
    """Bytes the worst-case step allocates on top of the loaded model."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    try:
        run_worst_case_step()
    except torch.cuda.OutOfMemoryError as exc:
        raise ValueError(f"the profiling step ({max_num_batched_tokens} tokens, {max_num_seqs} "
                         "sequences) ran out of GPU memory: lower --max-num-batched-tokens or --max-num-seqs") from exc
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - baseline


def run_worst_case_step(model, *, device: str, block_size: int, max_num_batched_tokens: int, max_num_seqs: int,
                        max_model_len: int, num_speculative_tokens: int = 0,
                        draft_step: Callable[[], None] | None = None) -> None:
    """The largest step the engine can run, with dummy tokens and no KV cache (the step's own
    K/V): the draft model's proposals (draft_step), a forward of the most tokens, the logits of
    the most rows and the sampler's heaviest path over them. Nothing it makes outlives it."""
    seq_lens, logit_rows, sampled_rows = worst_case_step(max_num_batched_tokens, max_num_seqs, max_model_len,
                                                         num_speculative_tokens)
    if draft_step is not None:  # drafting runs before the target's forward, each step
        draft_step()
    batch = make_attention_batch(seq_lens, seq_lens, None, block_size, device)
    ids = torch.zeros(sum(seq_lens), dtype=torch.long, device=device)
    with torch.inference_mode():
        hidden = model(ids, batch.positions(), batch, None)
        logits = model.compute_logits(hidden[torch.arange(logit_rows, device=device)])
        del hidden
    # Penalties, top-k with top-p (a full sort), min-p and logprobs: every vocabulary-wide
    # buffer sample() can make. A throwaway Sampler keeps the engine's generator untouched.
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                            presence_penalty=0.5, frequency_penalty=0.5, logprobs=MAX_LOGPROBS)
    prompt = [0]
    rows = [SamplingRow(params, prompt, [0]) for _ in range(sampled_rows)]
    Sampler(seed=0).sample(logits[torch.arange(sampled_rows, device=device)], rows)


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
