"""The device bookkeeping of one speculative round (vibee/runtime/device_rounds.py), as two Triton
kernels on a GPU and as torch ops elsewhere (the same arithmetic; tests compare them).

`prepare_round` turns each sequence's drafts into its k + 1 verification rows of the decode
graph (input token, position, KV slot, KV length); `finish_round` accepts the drafts that match
the target's argmax, appends the emitted tokens to the sequence's tokens and records the round.
As torch ops a round's bookkeeping is ~50 small kernels, each ~1.2 us of GPU time even inside a
CUDA graph (H200): about a quarter of a round of the built-in model. As two kernels it is two.

Layouts: sequence s owns graph rows s * (k + 1) + j, j = 0 .. k (its decode token, then its
drafts); `tables` is the graph's block-table buffer, where row s * (k + 1) holds s's table. A
sequence of length 0 is padding: its rows keep nothing and it never grows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def prepare_round(work, lens, allow, drafts, num_drafts, tables, *, block_size: int, padding_slot: int,
                  input_ids, positions, slot_mapping, seq_lens, kernels: bool | None = None) -> None:
    """Write the verification rows of the first B = len(lens) sequences. num_drafts is masked in
    place by `allow` and by padding (what finish_round then accepts from). kernels: run the
    Triton kernel (default: on a CUDA device; on the CPU it needs TRITON_INTERPRET=1)."""
    batch, k = drafts.shape
    if work.is_cuda if kernels is None else kernels:
        _prepare_kernel[(batch,)](work, work.stride(0), lens, allow, drafts, num_drafts, tables, tables.stride(0),
                                  tables.shape[1], input_ids, positions, slot_mapping, seq_lens, block_size,
                                  padding_slot, K=k, ROWS_POW2=triton.next_power_of_2(k + 1))
        return
    j = torch.arange(k + 1, device=work.device)
    live = lens > 0
    num_drafts.mul_(allow * live)
    pos = (lens[:, None] - 1 + j).clamp(min=0)
    kept = (j[None, :] <= num_drafts[:, None]) & live[:, None]
    first_rows = tables[: batch * (k + 1): k + 1]
    slots = first_rows.gather(1, (pos // block_size).clamp(max=tables.shape[1] - 1)).long() * block_size \
        + pos % block_size
    last = work.gather(1, (lens - 1).clamp(min=0)[:, None]).long()
    n = batch * (k + 1)
    input_ids[:n] = torch.cat([last, drafts], dim=1).view(-1)
    positions[:n] = torch.where(kept, pos, 0).view(-1)
    slot_mapping[:n] = torch.where(kept, slots, padding_slot).view(-1)
    seq_lens[:n] = torch.where(kept, pos + 1, 1).view(-1)


def finish_round(drafts, num_drafts, sampled, work, lens, last, *, kernels: bool | None = None) -> None:
    """Accept each sequence's leading drafts that equal the target's argmax (sampled, one per
    graph row), write its k + 1 targets after its tokens in `work` (those past the emitted ones
    are overwritten later), record [targets, drafted, accepted] in `last` and grow lens by the
    emitted count."""
    batch, k = drafts.shape
    if work.is_cuda if kernels is None else kernels:
        _finish_kernel[(batch,)](drafts, num_drafts, sampled, work, work.stride(0), work.shape[1], lens, last,
                                 K=k, ROWS_POW2=triton.next_power_of_2(k + 1))
        return
    targets = sampled[: batch * (k + 1)].view(batch, k + 1)
    j = torch.arange(k + 1, device=work.device)
    agree = (drafts == targets[:, :k]) & (j[None, :k] < num_drafts[:, None])
    accepted = agree.long().cumprod(dim=1).sum(dim=1)
    work.scatter_(1, (lens[:, None] + j).clamp(max=work.shape[1] - 1), targets.to(work.dtype))
    last[:batch, : k + 1] = targets
    last[:batch, k + 1] = num_drafts
    last[:batch, k + 2] = accepted
    lens.add_((accepted + 1) * (lens > 0))


@triton.jit
def _prepare_kernel(work, work_stride, lens, allow, drafts, num_drafts, tables, table_stride, table_cols,
                    input_ids, positions, slot_mapping, seq_lens, block_size, padding_slot,
                    K: tl.constexpr, ROWS_POW2: tl.constexpr):
    s = tl.program_id(0)
    j = tl.arange(0, ROWS_POW2)
    row_ok = j <= K
    length = tl.load(lens + s)
    live = length > 0
    count = tl.load(num_drafts + s) * tl.load(allow + s) * live.to(tl.int64)
    tl.store(num_drafts + s, count)
    pos = tl.maximum(length - 1 + j, 0)
    kept = (j <= count) & live
    table = tables + (s * (K + 1)).to(tl.int64) * table_stride
    block = tl.load(table + tl.minimum(pos // block_size, table_cols - 1), mask=row_ok, other=0).to(tl.int64)
    slot = block * block_size + pos % block_size
    last = tl.load(work + s.to(tl.int64) * work_stride + tl.maximum(length - 1, 0)).to(tl.int64)
    draft = tl.load(drafts + s * K + j - 1, mask=row_ok & (j > 0), other=0)
    token = tl.where(j == 0, last, draft)
    at = s * (K + 1) + j
    tl.store(input_ids + at, token, mask=row_ok)
    tl.store(positions + at, tl.where(kept, pos, 0), mask=row_ok)
    tl.store(slot_mapping + at, tl.where(kept, slot, padding_slot), mask=row_ok)
    tl.store(seq_lens + at, tl.where(kept, pos + 1, 1).to(tl.int32), mask=row_ok)


@triton.jit
def _finish_kernel(drafts, num_drafts, sampled, work, work_stride, width, lens, last,
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
    at = tl.minimum(length + j, width - 1)
    tl.store(work + s.to(tl.int64) * work_stride + at, targets.to(tl.int32), mask=row_ok)
    out = last + s * (K + 3)
    tl.store(out + j, targets, mask=row_ok)
    tl.store(out + K + 1, count)
    tl.store(out + K + 2, accepted.to(tl.int64))
    tl.store(lens + s, length + (accepted + 1) * (length > 0).to(tl.int64))
