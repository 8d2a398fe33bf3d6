"""The device bookkeeping of one speculative round (vibee/runtime/device_rounds.py), as two Triton
kernels on a GPU and as torch ops elsewhere (the same arithmetic; tests compare them).

`prepare_round` turns each sequence's drafts into its k + 1 verification rows of the decode
graph (input token, position, KV slot, KV length); `finish_round` accepts the drafts that match
the target's argmax, appends the emitted tokens to the sequence's tokens and records the round.
As torch ops a round's bookkeeping is ~50 small kernels, each ~1.2 us of GPU time even inside a
CUDA graph (H200): about a quarter of a round of the built-in model. As two kernels it is two.

Layouts: sequence s owns graph rows s * (k + 1) + j, j = 0 .. k (its decode token, then its
drafts); `tables` is the graph's block-table buffer, where row s * (k + 1) holds s's table.
Token t of sequence s is work[s, t % width]: a row holds the whole sequence when it is wide
enough (n-gram drafting reads it), and only its latest tokens as a ring otherwise (plain
decoding reads the last one). A sequence of length 0 is padding, and one whose length reached
its limit (the slots the scheduler gave it) is done: their rows keep nothing and they never
grow; a done sequence's round records accepted = -1 (it emitted nothing).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def prepare_round(work, lens, limits, allow, drafts, num_drafts, tables, *, block_size: int, padding_slot: int,
                  input_ids, positions, slot_mapping, seq_lens, kernels: bool | None = None) -> None:
    """Write the verification rows of the first B = len(lens) sequences. num_drafts is masked in
    place by `allow`, by padding and by limits, and cut to what a sequence's limit leaves after
    its decode token (what finish_round then accepts from): no row writes K/V at or past
    limit - 1, and no round grows a sequence past its limit. kernels:
    run the Triton kernel (default: on a CUDA device; on the CPU it needs TRITON_INTERPRET=1)."""
    batch, k = drafts.shape
    if work.is_cuda if kernels is None else kernels:
        _prepare_kernel[(batch,)](work, work.stride(0), work.shape[1], lens, limits, allow, drafts, num_drafts, tables,
                                  tables.stride(0), tables.shape[1], input_ids, positions, slot_mapping, seq_lens,
                                  block_size, padding_slot, K=k, ROWS_POW2=triton.next_power_of_2(k + 1))
        return
    j = torch.arange(k + 1, device=work.device)
    live = (lens > 0) & (lens < limits)
    num_drafts.mul_(allow * live)
    torch.minimum(num_drafts, (limits - lens - 1).clamp(min=0), out=num_drafts)
    pos = (lens[:, None] - 1 + j).clamp(min=0)
    kept = (j[None, :] <= num_drafts[:, None]) & live[:, None]
    first_rows = tables[: batch * (k + 1): k + 1]
    slots = first_rows.gather(1, (pos // block_size).clamp(max=tables.shape[1] - 1)).long() * block_size \
        + pos % block_size
    last = work.gather(1, ((lens - 1).clamp(min=0) % work.shape[1])[:, None]).long()
    n = batch * (k + 1)
    input_ids[:n] = torch.cat([last, drafts], dim=1).view(-1)
    positions[:n] = torch.where(kept, pos, 0).view(-1)
    slot_mapping[:n] = torch.where(kept, slots, padding_slot).view(-1)
    seq_lens[:n] = torch.where(kept, pos + 1, 1).view(-1)


def finish_round(drafts, num_drafts, sampled, work, lens, limits, last, *, kernels: bool | None = None) -> None:
    """Accept each sequence's leading drafts that equal the target's token (sampled, one per
    graph row), write its k + 1 targets after its tokens in `work` (those past the emitted ones
    are overwritten later), record [targets, drafted, accepted] in `last` and grow lens by the
    emitted count (a done sequence: accepted -1, nothing written, no growth)."""
    batch, k = drafts.shape
    if work.is_cuda if kernels is None else kernels:
        _finish_kernel[(batch,)](drafts, num_drafts, sampled, work, work.stride(0), work.shape[1], lens, limits, last,
                                 K=k, ROWS_POW2=triton.next_power_of_2(k + 1))
        return
    targets = sampled[: batch * (k + 1)].view(batch, k + 1)
    j = torch.arange(k + 1, device=work.device)
    agree = (drafts == targets[:, :k]) & (j[None, :k] < num_drafts[:, None])
    accepted = agree.long().cumprod(dim=1).sum(dim=1)
    alive = (lens > 0) & (lens < limits)
    at = (lens[:, None] + j) % work.shape[1]
    work.scatter_(1, at, torch.where(alive[:, None], targets.to(work.dtype), work.gather(1, at)))
    last[:batch, : k + 1] = targets
    last[:batch, k + 1] = num_drafts
    last[:batch, k + 2] = torch.where(alive, accepted, -1)
    lens.add_((accepted + 1) * alive)


@triton.jit
def _prepare_kernel(work, work_stride, width, lens, limits, allow, drafts, num_drafts, tables, table_stride,
                    table_cols, input_ids, positions, slot_mapping, seq_lens, block_size, padding_slot,
                    K: tl.constexpr, ROWS_POW2: tl.constexpr):
    s = tl.program_id(0)
    j = tl.arange(0, ROWS_POW2)
    row_ok = j <= K
    length = tl.load(lens + s)
    live = (length > 0) & (length < tl.load(limits + s))
    count = tl.load(num_drafts + s) * tl.load(allow + s) * live.to(tl.int64)
    count = tl.minimum(count, tl.maximum(tl.load(limits + s) - length - 1, 0))
    tl.store(num_drafts + s, count)
    pos = tl.maximum(length - 1 + j, 0)
    kept = (j <= count) & live
    table = tables + (s * (K + 1)).to(tl.int64) * table_stride
    block = tl.load(table + tl.minimum(pos // block_size, table_cols - 1), mask=row_ok, other=0).to(tl.int64)
    slot = block * block_size + pos % block_size
    last = tl.load(work + s.to(tl.int64) * work_stride + tl.maximum(length - 1, 0) % width).to(tl.int64)
    draft = tl.load(drafts + s * K + j - 1, mask=row_ok & (j > 0), other=0)
    token = tl.where(j == 0, last, draft)
    at = s * (K + 1) + j
    tl.store(input_ids + at, token, mask=row_ok)
    tl.store(positions + at, tl.where(kept, pos, 0), mask=row_ok)
    tl.store(slot_mapping + at, tl.where(kept, slot, padding_slot), mask=row_ok)
    tl.store(seq_lens + at, tl.where(kept, pos + 1, 1).to(tl.int32), mask=row_ok)


@triton.jit
def _finish_kernel(drafts, num_drafts, sampled, work, work_stride, width, lens, limits, last,
                   K: tl.constexpr, ROWS_POW2: tl.constexpr):
    s = tl.program_id(0)
    j = tl.arange(0, ROWS_POW2)
    row_ok = j <= K
    targets = tl.load(sampled + s * (K + 1) + j, mask=row_ok, other=0)
    count = tl.load(num_drafts + s)
    draft = tl.load(drafts + s * K + j, mask=j < K, other=-1)
    disagree = (j >= count) | (draft != targets) | (j >= K)
    accepted = tl.min(tl.where(disagree, j, K), axis=0)  # leading agreements
    length = tl.load(lens + s)
    alive = (length > 0) & (length < tl.load(limits + s))
    at = (length + j) % width
    tl.store(work + s.to(tl.int64) * work_stride + at, targets.to(tl.int32), mask=row_ok & alive)
    out = last + s * (K + 3)
    tl.store(out + j, targets, mask=row_ok)
    tl.store(out + K + 1, count)
    tl.store(out + K + 2, tl.where(alive, accepted.to(tl.int64), -1))
    tl.store(lens + s, length + (accepted + 1) * alive.to(tl.int64))
