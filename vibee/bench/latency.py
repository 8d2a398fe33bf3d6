"""`vibee bench latency`: decode speed of the model runner at a small batch, against the memory
bandwidth limit.

A decode step must read every weight and the batch's KV once, so at batch 1 the step time is
bounded below by bytes / bandwidth. The runner here is the engine's (the generated attention and
paged KV cache, the model of vibee/runtime/model.py); the scheduler and sampler are left out
(greedy argmax), so what is timed is the model step itself. Model shapes of well-known models run
with random weights (no files needed); `--model DIR` runs a real checkpoint.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from vibee.runtime.attention import make_attention_batch
from vibee.runtime.cuda_graphs import num_sms, splits_for_batch
from vibee.runtime.model import LlamaForCausalLM


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_rank(params: dict[str, Any], ranks: Any = None, *, on_step=None, progress: bool = False) -> dict[str, Any]:
    """Build the model `params` (the command's options) name, keep this rank's shard of it (ranks:
    a RankGroup, or None for one rank) and measure its decode. Every rank runs this alike (SPMD,
    as gpt-fast does): same prompts, same steps, each over its shard, the layers' collectives
    pairing up (inside the CUDA graphs on GPUs). Returns the measurement and what it ran."""
    p = params
    run = build_rank_model(params, ranks, progress=progress)
    model, gen, dev = run["model"], run["gen"], run["device"]
    steps = p["prompt_len"] + p["warmup_steps"] + p["decode_steps"] + 1
    # the split count the engine's graph for this batch uses
    splits = (splits_for_batch(gen.flash_attention.num_splits_for(steps), p["batch_size"], run["num_kv_heads"],
                               num_sms(dev)) if run["cuda_graphs"] else None)
    run["measured"] = measure_decode(model, gen.kv_cache, batch_size=p["batch_size"], prompt_len=p["prompt_len"],
                                     decode_steps=p["decode_steps"], warmup_steps=p["warmup_steps"], device=dev,
                                     block_size=gen.configs.kv_cache.block_size, on_step=on_step, num_splits=splits,
                                     num_kv_heads=run["num_kv_heads"], sync_steps=p.get("sync_steps", False))
    run["cuda_graphs"] = splits is not None
    return run


def build_rank_model(params: dict[str, Any], ranks: Any = None, *, progress: bool = False) -> dict[str, Any]:
    """The model `params` name (a shape with random weights, or a checkpoint), quantized as they
    say and sharded for this rank: the model, its config, name and generated modules, the device
    and dtype, the bytes loaded, this rank's KV heads and whether decode steps replay CUDA graphs."""
    from vibee.engine_flags import engine_config
    from vibee.runtime.engine import TORCH_DTYPES
    from vibee.runtime.generated import load_generated
    from vibee.runtime.loader import load_model_dir
    from vibee.runtime.model import build_model
    from vibee.runtime.served_model import quantize, shard_served_model
    from vibee.runtime.shapes import SyntheticTokenizer, random_model, shape_config

    p = params
    config = engine_config(model=p["model"], device=p["device"], dtype=p["dtype"], quant=p["quant"],
                           flash_attn=p["flash_attn"], spec_dir=p.get("spec_dir"))
    dev = ranks.device if ranks is not None else config.resolve_device()
    dtype_name = config.resolve_dtype(dev)
    dtype = TORCH_DTYPES[dtype_name]
    gen = load_generated(config.spec_dir, config.knob_settings(dtype_name))
    if p["shape"] is not None:
        model_config = shape_config(p["shape"])
        model = random_model(model_config, gen, flash_attn=p["flash_attn"], dtype=dtype, device=dev)
        name, tokenizer = f"{p['shape']} (random weights)", SyntheticTokenizer(model_config.vocab_size)
    else:
        loaded = load_model_dir(config.model_dir, dtype=dtype, device=dev, progress=progress)
        model, model_config = build_model(loaded, gen, flash_attn=p["flash_attn"]).eval(), loaded.config
        name, tokenizer = config.model_name, loaded.tokenizer
    loaded_bytes = weight_bytes(model)
    if p["quant"] != "none":
        quantize(model, tokenizer, gen, None if p["shape"] is not None else config.model_dir,
                 model_config.max_position_embeddings, dev, progress=progress)
    num_kv_heads = shard_served_model(model, gen, ranks) if ranks is not None else model_config.num_kv_heads
    use_graphs = dev.startswith("cuda") and p["flash_attn"] and not p["enforce_eager"]
    return {"model": model, "model_config": model_config, "name": name, "gen": gen, "tokenizer": tokenizer,
            "device": dev, "dtype_name": dtype_name, "loaded_bytes": loaded_bytes, "num_kv_heads": num_kv_heads,
            "cuda_graphs": use_graphs}


def measure_decode(model: LlamaForCausalLM, kv_module, *, batch_size: int, prompt_len: int, decode_steps: int,
                   warmup_steps: int, device: str, block_size: int, on_step=None,
                   num_splits: int | None = None, num_kv_heads: int | None = None,
                   sync_steps: bool = False) -> dict[str, Any]:
    """Prefill batch_size prompts of prompt_len random tokens, then decode greedily; returns the
    per-step times (seconds) of the timed decode steps and the context length at each.
    num_splits: replay each decode step as a CUDA graph (as the engine does) with this KV split count.
    The replayed steps are launched back to back, as the engine launches them (its host prepares
    step i + 1 while step i runs; the tokens never leave the GPU), each timed on the GPU's timeline
    by CUDA events from its inputs' copy to the next step's: the host's time shows only where the
    GPU waits for it. sync_steps: wait for each step to finish before preparing the next (every
    step then also pays its preparation on the host); eager steps always do (they read lengths on
    the host). num_kv_heads: the KV heads this rank's cache holds (default: the model's)."""
    from vibee.runtime.cuda_graphs import DecodeGraphs

    cfg = model.config
    total = prompt_len + warmup_steps + decode_steps + 1
    blocks_per_seq = math.ceil(total / block_size)
    # One block more than the sequences use: the scratch a captured batch's padding rows write to.
    cache = kv_module.PagedKVCache(cfg.num_layers, batch_size * blocks_per_seq + 1, num_kv_heads or cfg.num_kv_heads,
                                   cfg.head_dim, dtype=model.dtype, device=device, block_size=block_size)
    graphs = None
    if num_splits is not None:
        graphs = DecodeGraphs(model, cache, max_batch=batch_size, max_model_len=blocks_per_seq * block_size,
                              block_size=block_size, padding_slot=batch_size * blocks_per_seq * block_size,
                              num_splits=num_splits,
                              sampled=torch.zeros(batch_size, dtype=torch.long, device=device))
        graphs.capture()
    tables = [list(range(s * blocks_per_seq, (s + 1) * blocks_per_seq)) for s in range(batch_size)]
    table_rows = np.asarray(tables, dtype=np.int64)  # DecodeGraphs takes the tables as one array
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch_size * prompt_len,), generator=g).to(device)
    with torch.inference_mode():
        batch = make_attention_batch([prompt_len] * batch_size, [prompt_len] * batch_size, tables, block_size, device)
        hidden = model(ids, batch.positions(), batch, cache)
        last = torch.arange(1, batch_size + 1, device=device) * prompt_len - 1
        tokens = model.compute_logits(hidden[last]).argmax(dim=-1)
        times, contexts = [], []
        length = prompt_len
        if graphs is not None:  # each step's argmax stays in the graphs' buffer, the next step's input
            graphs.sampled[:batch_size].copy_(tokens)
            no_ids, feedback = [0] * batch_size, list(range(batch_size))
        back_to_back = graphs is not None and not sync_steps
        marks = []  # back to back: a CUDA event before each timed step and after the last
        for step in range(warmup_steps + decode_steps):
            length += 1
            timed = step >= warmup_steps
            if not (back_to_back and timed):
                _sync(device)
            t0 = time.perf_counter()
            if back_to_back and timed:
                marks.append(torch.cuda.Event(enable_timing=True))
                marks[-1].record()
            if graphs is not None:  # as the engine replays a greedy step: the tokens never leave the GPU
                graphs.run(no_ids, [length] * batch_size, table_rows, feedback)
            else:
                batch = make_attention_batch([1] * batch_size, [length] * batch_size, tables, block_size, device)
                hidden = model(tokens, batch.positions(), batch, cache)
                tokens = model.compute_logits(hidden).argmax(dim=-1)
            if timed:
                if not back_to_back:
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                contexts.append(length)
            if on_step:
                on_step()
        if marks:
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
            marks[-1].synchronize()
            times = [a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:])]
    return {"step_times_s": times, "context_lens": contexts,
            "timing": "back to back (CUDA events)" if back_to_back else "each step waited for (host clock)"}


def weight_bytes(model: torch.nn.Module, rows: int | None = None) -> int:
    """Bytes of every parameter and buffer, once (tied weights once). With `rows`: what a decode
    step of that many sequences reads, the same except that an embedding table nothing else reads
    costs only the rows looked up (a quantized model keeps its bf16 table for the lookup and reads lm_head's codes:
    counting the whole table put Llama-3.2-1B int4's limit at 1.16 GB a step for 0.64)."""
    lookup_only = {m.weight.data_ptr(): m.weight[0].numel() * m.weight.element_size()
                   for m in model.modules() if isinstance(m, torch.nn.Embedding) and rows is not None}
    for m in model.modules():
        if not isinstance(m, torch.nn.Embedding):
            for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                lookup_only.pop(t.data_ptr(), None)
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += rows * lookup_only[t.data_ptr()] if t.data_ptr() in lookup_only else t.numel() * t.element_size()
    return total


def summarize_decode(measured: dict[str, Any], *, batch_size: int, weight_bytes_: int, kv_bytes_per_token: int,
                     bandwidth_gbs: float | None) -> dict[str, Any]:
    times = measured["step_times_s"]
    mean_step = sum(times) / len(times)
    # Bytes one step must read: the weights, plus each sequence's KV so far (mean context).
    mean_context = sum(measured["context_lens"]) / len(measured["context_lens"])
    step_bytes = weight_bytes_ + batch_size * mean_context * kv_bytes_per_token
    out = {"decode_steps": len(times), "mean_step_ms": 1000 * mean_step,
           "median_step_ms": 1000 * sorted(times)[len(times) // 2],
           "tokens_per_s": batch_size / mean_step, "weight_bytes": weight_bytes_, "bytes_per_step": step_bytes,
           "achieved_gbs": step_bytes / mean_step / 1e9}
    if bandwidth_gbs:
        limit_step = step_bytes / (bandwidth_gbs * 1e9)
        out.update(bandwidth_gbs=bandwidth_gbs, limit_tokens_per_s=batch_size / limit_step,
                   fraction_of_limit=limit_step / mean_step)
    return out


def plot_decode(measured: dict[str, Any], summary: dict[str, Any], path, title: str):
    from vibee.bench.plot import figure, save

    fig, ax = figure(figsize=(8, 4.5))
    ax.plot(measured["context_lens"], [1000 * t for t in measured["step_times_s"]], label="decode step")
    if "limit_tokens_per_s" in summary:
        limit_ms = 1000 * summary["bytes_per_step"] / (summary["bandwidth_gbs"] * 1e9)
        ax.axhline(limit_ms, linestyle="--", color="gray",
                   label=f"bandwidth limit ({summary['bandwidth_gbs']:.0f} GB/s): {limit_ms:.2f} ms")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("ms per step")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path, title)
