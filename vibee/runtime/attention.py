"""Attention for one engine step: where the step's tokens are (AttentionBatch) and the call into
the generated attention module (AttentionBackend).

A step's tokens are flattened, sequence after sequence, with no padding. With a KV cache the new
K/V are written to their slots first, then a decode step (one token per sequence) runs
`paged_decode`, a step of fresh prompts only (no cached prefix) `varlen_attention` over the step's
own K/V, and any other step `paged_prefill` (prompt chunks after a cached prefix, prefix-cache
hits, decode tokens mixed in). Without a cache each step holds every token of every
sequence and runs `varlen_attention` over the step's own K/V.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from vibee.kinds.flash_attention.interface import AttentionFunctions
from vibee.runtime.host_copy import to_device


@dataclass
class AttentionBatch:
    # The step's tokens are flattened: sequence 0's new tokens, then sequence 1's, ...
    cu_seqlens_q: torch.Tensor  # int32 [B+1], offsets of each sequence's new tokens
    seq_lens: torch.Tensor  # int32 [B], KV length after this step (cached prefix + new tokens)
    block_tables: torch.Tensor | None  # int32 [B, max_blocks] (None when there is no KV cache)
    slot_mapping: torch.Tensor | None  # int64 [T], slot = block_id * block_size + offset of each new token
    is_decode: bool  # every sequence has exactly one new token (use paged_decode)
    # No sequence has a cached prefix (every new token list is the whole sequence): attention can
    # run over the step's own contiguous K/V instead of reading them back from the pages.
    fresh: bool = False
    # Decode only: a fixed KV split count (CUDA graphs: nothing may depend on the step's lengths).
    num_splits: int | None = None
    # The same offsets and lengths on the host, and every new token's position on the device, when
    # the batch was made from host values: attention and positions then read nothing back.
    cu_seqlens_q_host: list[int] | None = None
    seq_lens_host: list[int] | None = None
    positions_tensor: torch.Tensor | None = None

    def positions(self) -> torch.Tensor:
        """The position of every new token (long [T]): a sequence's new tokens are its last ones."""
        if self.positions_tensor is not None:
            return self.positions_tensor
        q_lens = (self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]).long()
        seq = torch.repeat_interleave(torch.arange(len(q_lens), device=q_lens.device), q_lens)
        offset_in_seq = torch.arange(int(self.cu_seqlens_q[-1]), device=q_lens.device) - self.cu_seqlens_q[:-1].long()[seq]
        return (self.seq_lens.long() - q_lens)[seq] + offset_in_seq


def _even(i: int) -> int:
    return i + (i & 1)


def make_attention_batch(query_lens: Sequence[int], seq_lens: Sequence[int],
                         block_tables: Sequence[Sequence[int]] | np.ndarray | None,
                         block_size: int, device: torch.device | str = "cpu") -> AttentionBatch:
    """An AttentionBatch from host values: sequence s has query_lens[s] new tokens, which are its
    last ones of seq_lens[s]. block_tables: each sequence's block ids, as lists or as the rows of
    an int array [B, w] (0 past a row's table); None: no KV cache (then query_lens must equal
    seq_lens). Computed with numpy and sent to the device in one copy."""
    if len(query_lens) != len(seq_lens):
        raise ValueError(f"query_lens has {len(query_lens)} entries and seq_lens {len(seq_lens)}")
    q_lens = np.asarray(query_lens, dtype=np.int64).reshape(-1)
    kv_lens = np.asarray(seq_lens, dtype=np.int64).reshape(-1)
    num_seqs = len(q_lens)
    cu = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(q_lens, out=cu[1:])
    if block_tables is None:
        if not np.array_equal(q_lens, kv_lens):
            raise ValueError("without a KV cache every step feeds whole sequences (query_lens == seq_lens)")
        host = np.concatenate([cu, kv_lens])
        buf = to_device(host, device)
        return AttentionBatch(cu_seqlens_q=buf[: num_seqs + 1].to(torch.int32),
                              seq_lens=buf[num_seqs + 1:].to(torch.int32),
                              block_tables=None, slot_mapping=None, is_decode=False,
                              cu_seqlens_q_host=cu.tolist(), seq_lens_host=kv_lens.tolist())
    if isinstance(block_tables, np.ndarray):
        table = block_tables.astype(np.int64, copy=False)
    else:
        width = max((len(t) for t in block_tables), default=0) or 1
        table = np.zeros((num_seqs, width), dtype=np.int64)  # padding points at block 0, never read
        for s, row in enumerate(block_tables):
            table[s, : len(row)] = row
    # Each new token's sequence and position (a sequence's new tokens are its last ones), then its slot.
    seq = np.repeat(np.arange(num_seqs), q_lens)
    positions = (kv_lens - q_lens)[seq] + np.arange(int(cu[-1])) - cu[:-1][seq]
    slots = table[seq, positions // block_size] * block_size + positions % block_size
    # Slots and positions start 16 bytes in (an even int64 index): Triton specializes a pointer
    # argument on 16-byte alignment, so with alignment following the batch's sizes a kernel reading
    # them (RoPE's) compiled again for batches whose sizes no warm-up had, mid-serving.
    slots_at = _even(2 * num_seqs + 1)
    positions_at = _even(slots_at + len(slots))
    tables_at = positions_at + len(positions)
    host = np.zeros(tables_at + table.size, dtype=np.int64)
    for at, part in ((0, cu), (num_seqs + 1, kv_lens), (slots_at, slots), (positions_at, positions), (tables_at, table)):
        host[at: at + part.size] = part.reshape(-1)
    buf = to_device(host, device)
    return AttentionBatch(
        cu_seqlens_q=buf[: num_seqs + 1].to(torch.int32),
        seq_lens=buf[num_seqs + 1: 2 * num_seqs + 1].to(torch.int32),
        block_tables=buf[tables_at:].view(table.shape).to(torch.int32),
        slot_mapping=buf[slots_at: slots_at + len(slots)],
        is_decode=bool((q_lens == 1).all()),
        fresh=bool(np.array_equal(q_lens, kv_lens)),
        cu_seqlens_q_host=cu.tolist(), seq_lens_host=kv_lens.tolist(),
        positions_tensor=buf[positions_at: tables_at],
    )


class AttentionBackend:
    """Calls one generated attention module (`flash_attention`, or `flash_attention_reference`
    for --no-flash-attn) for every layer of a model.

    int8 KV pages (a kv_cache generated with kv_dtype int8) hold a float32 scale per (block, kv
    head) that the attention kernels don't read: such pages are dequantized before the call.
    fp8 pages (kv_dtype fp8) have no scale and go to the kernels as they are (they widen them);
    a fresh prompt attends to its own unrounded K/V, as with 16-bit pages.
    Only the blocks in the step's block tables are converted, into a scratch copy laid out in
    block-table order, so the cost is one pass over the batch's KV per layer and step (in time
    and in scratch memory), on top of the attention itself.
    """

    def __init__(self, fa_module: AttentionFunctions, *, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float | None = None, variants: Sequence[Any] = (), fuse_kv_store: bool = True):
        """fuse_kv_store: the kv_cache spec's knob (pages_to_write)."""
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.fa = fa_module
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.variants = tuple(variants)
        self.fuse_kv_store = fuse_kv_store

    def pages_to_write(self, layer: int, batch: AttentionBatch, kv_cache: Any, k: torch.Tensor) -> tuple | None:
        """(k pages, v pages, slots) that the step's K/V may be stored into by RoPE's kernel (the
        decoder module's KVWrite; the model asks only where its ops run kernels): pages without
        scales (16-bit, fp8) on k's device, a batch with slots, with the kv_cache spec's
        fuse_kv_store on. None where the cache's own write must run (no cache, int8 pages with
        their scales, fuse_kv_store off)."""
        if not self.fuse_kv_store or kv_cache is None or batch.block_tables is None or batch.slot_mapping is None:
            return None
        k_pages, v_pages = kv_cache.k_pages[layer], kv_cache.v_pages[layer]
        if getattr(k_pages, "scale", None) is not None or k_pages.data.device != k.device:
            return None
        return k_pages.data, v_pages.data, batch.slot_mapping

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch,
                 kv_cache: Any, *, window: int | None = None, kv_written: bool = False) -> torch.Tensor:
        """q [T, H, D], k and v [T, Hkv, D] of the step's new tokens -> out [T, H, D] in q's dtype.
        window: this layer's sliding window (a query sees the `window` latest keys, itself
        included), passed to the generated kernels as their runtime argument; None: no window.
        kv_written: k and v are already in the cache (RoPE's kernel stored them: pages_to_write)."""
        variants = self.variants
        # The batch's lengths on the host, where it has them: the calls then read nothing back
        # (each read is a sync with the device, once per layer).
        cu_host = batch.cu_seqlens_q_host
        own_kv = {} if cu_host is None else {"cu_seqlens_q_host": cu_host, "cu_seqlens_k_host": cu_host}
        if kv_cache is None or batch.block_tables is None:
            out = self.fa.varlen_attention(q, k, v, batch.cu_seqlens_q, batch.cu_seqlens_q, causal=True,
                                           variants=variants, scale=self.scale, window=window, **own_kv)
            return out.to(dtype=q.dtype, device=q.device)
        if not kv_written:
            kv_cache.write(layer, k, v, batch.slot_mapping)
        if batch.fresh and not batch.is_decode and getattr(kv_cache.k_pages[layer], "scale", None) is None:
            # Fresh prompts: the step's own K/V are all there is to attend to, contiguous (the
            # kernel's fast path; the paged one gathers 16-token pages). int8 pages are read back
            # instead, so that a prompt sees the K/V its later tokens will see.
            out = self.fa.varlen_attention(q, k, v, batch.cu_seqlens_q, batch.cu_seqlens_q, causal=True,
                                           variants=variants, scale=self.scale, window=window, **own_kv)
            return out.to(dtype=q.dtype, device=q.device)
        k_pages, v_pages, tables = self._pages(kv_cache, layer, batch, q.dtype)
        if batch.is_decode:
            fixed = {} if batch.num_splits is None else {"num_splits": batch.num_splits}
            out = self.fa.paged_decode(q, k_pages, v_pages, tables, batch.seq_lens, variants=variants, scale=self.scale,
                                       window=window, **fixed)
        else:
            paged = {} if cu_host is None else {"cu_seqlens_q_host": cu_host, "seq_lens_host": batch.seq_lens_host}
            out = self.fa.paged_prefill(q, k_pages, v_pages, tables, batch.cu_seqlens_q, batch.seq_lens, causal=True,
                                        variants=variants, scale=self.scale, window=window, **paged)
        return out.to(dtype=q.dtype, device=q.device)

    @staticmethod
    def _pages(kv_cache: Any, layer: int, batch: AttentionBatch, dtype: torch.dtype):
        """This layer's K/V pages as the kernels read them, with the block tables that index them."""
        k_pages, v_pages = kv_cache.k_pages[layer], kv_cache.v_pages[layer]
        k_scale = getattr(k_pages, "scale", None)
        if k_scale is None:
            return k_pages.data, v_pages.data, batch.block_tables
        # int8: dequantize the pages of every block-table entry (padding included; a block shared
        # by several sequences is converted once per entry) into scratch pages 0..B*max_blocks-1.
        tables = batch.block_tables
        ids = tables.reshape(-1).long()

        def dequantize(pages) -> torch.Tensor:
            return (pages.data[ids].float() * pages.scale[ids][:, None, :, None]).to(dtype)

        scratch_tables = torch.arange(ids.numel(), dtype=torch.int32, device=tables.device).view(tables.shape)
        return dequantize(k_pages), dequantize(v_pages), scratch_tables
