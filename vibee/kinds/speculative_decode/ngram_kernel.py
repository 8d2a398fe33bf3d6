"""The n-gram drafter on the device as one Triton kernel (static code beside its kind: the
generated speculative_decode module's `ngram_propose_on_device` calls it for CUDA tensors, and its
generated tests check it against the reference drafter, on the CPU under TRITON_INTERPRET=1)."""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def _ngram_propose_kernel(tokens, stride, lengths, drafts, num_drafts, K: tl.constexpr, K_POW2: tl.constexpr,
                          MIN_N: tl.constexpr, MAX_N: tl.constexpr, BLOCK: tl.constexpr):
    # One program per row: for n = MAX_N .. MIN_N, scan the row's n-gram starts 0 .. length-n-1
    # in blocks for the latest one equal to its last n tokens; the first n with one wins.
    row = tl.program_id(0)
    base = tokens + row.to(tl.int64) * stride
    length = tl.load(lengths + row).to(tl.int32)
    best = length * 0 - 1  # the winning occurrence's start (-1: none yet)
    best_n = length * 0
    for n in tl.static_range(MAX_N, MIN_N - 1, -1):
        latest = length * 0 - 1
        for start in range(0, length, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            hit = offs <= length - 1 - n
            for j in tl.static_range(n):
                tail = tl.load(base + tl.maximum(length - n + j, 0))
                hit = hit & (tl.load(base + offs + j, mask=hit, other=-1) == tail)
            latest = tl.maximum(latest, tl.max(tl.where(hit, offs, -1), axis=0))
        take = (best < 0) & (latest >= 0)
        best = tl.where(take, latest, best)
        best_n = tl.where(take, n, best_n)
    follower = best + best_n
    count = tl.where(best >= 0, tl.minimum(tl.maximum(length - follower, 0), K), 0)
    koffs = tl.arange(0, K_POW2)
    draft = tl.load(base + follower + koffs, mask=koffs < count, other=0)
    tl.store(drafts + row * K + koffs, draft.to(tl.int64), mask=koffs < K)
    tl.store(num_drafts + row, count.to(tl.int64))


def triton_ngram_propose(drafter: Any, tokens: torch.Tensor,
                         lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ngram_propose_on_device as one kernel launch (rows in parallel, each scanning only its
    own length): on a CUDA device, or on the CPU under TRITON_INTERPRET=1. tokens [B, W] with
    unit stride along W; lengths [B]."""
    batch, width = tokens.shape
    if tokens.stride(1) != 1:
        raise ValueError("tokens must be contiguous along their last dimension")
    k = drafter.num_speculative_tokens
    drafts = torch.empty(batch, k, dtype=torch.long, device=tokens.device)
    num_drafts = torch.empty(batch, dtype=torch.long, device=tokens.device)
    _ngram_propose_kernel[(batch,)](tokens, tokens.stride(0), lengths, drafts, num_drafts, K=k,
                                    K_POW2=triton.next_power_of_2(k), MIN_N=drafter.min_n,
                                    MAX_N=min(drafter.max_n, max(width - 1, drafter.min_n)), BLOCK=1024)
    return drafts, num_drafts
