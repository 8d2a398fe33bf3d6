"""Run every prefill shape the generated attention autotunes on before the first request does.

The Triton prefill kernel autotunes per power-of-two bucket of a step's longest query (and per
contiguous or paged K/V): the first step to hit a bucket times every candidate tile, which takes
a second or more. Left to requests, that second lands on whoever first sends a prompt of a new
length, and on every sequence batched with it. At startup it costs one pass per bucket.
"""

from __future__ import annotations

import torch

from vibee.runtime.attention import make_attention_batch

FIRST_BUCKET = 16  # the generated kernel's smallest query bucket


def prefill_buckets(max_tokens: int) -> list[int]:
    """Query lengths that reach every bucket up to max_tokens: 16, 32, ... and max_tokens itself
    (its bucket is the next power of two at or above it)."""
    sizes, n = [], FIRST_BUCKET
    while n < max_tokens:
        sizes.append(n)
        n *= 2
    sizes.append(max_tokens)
    return sizes


@torch.inference_mode()
def warm_prefill(model, kv_cache, *, max_tokens: int, block_size: int, scratch_block: int) -> list[int]:
    """One forward per bucket, over fresh K/V (a whole prompt) and over paged K/V (a prompt after
    a cached token), with every table entry on `scratch_block`: the block no sequence owns (the
    CUDA graphs' padding rows write there too), so no sequence's K/V change. Returns the lengths run."""
    device = model.device
    sizes = prefill_buckets(max_tokens)
    for n in sizes:
        for cached in (0, 1):  # fresh: contiguous attention over the step's K/V; cached: paged
            table = [[scratch_block] * -(-(n + cached) // block_size)]
            batch = make_attention_batch([n], [n + cached], table, block_size, device)
            ids = torch.zeros(n, dtype=torch.long, device=device)
            model.compute_logits(model(ids, batch.positions(), batch, kv_cache)[-1:])
    torch.cuda.synchronize(device)
    return sizes


@torch.inference_mode()
def warm_decode(model, kv_cache, *, block_size: int, scratch_block: int) -> list[int]:
    """One eager one-token step per KV split count the generated decode can pick (each count is
    a kernel variant), for a model whose decode steps are not captured in CUDA graphs (the draft
    model): the first step to meet a count would otherwise compile it, mid-request. Returns the
    KV lengths run (the shortest with each split count)."""
    fa = model.attention.fa
    min_block_kv, max_splits = getattr(fa, "MIN_BLOCK_KV", None), getattr(fa, "MAX_SPLITS", None)
    if min_block_kv is None or max_splits is None:  # the reference attention: nothing to compile
        return []
    device = model.device
    shortest: dict[int, int] = {}  # split count -> the shortest KV length that gets it
    for s in range(1, max_splits + 1):
        shortest.setdefault(fa.num_splits_for(min_block_kv * s), min_block_kv * s)
    lens = sorted(shortest.values())
    for n in lens:
        table = [[scratch_block] * -(-n // block_size)]
        batch = make_attention_batch([1], [n], table, block_size, device)
        ids = torch.zeros(1, dtype=torch.long, device=device)
        model.compute_logits(model(ids, batch.positions(), batch, kv_cache)).argmax(dim=-1)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
    return lens
