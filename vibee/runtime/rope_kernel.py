"""RoPE on a step's q and k in one Triton kernel (one program a token), optionally storing the
rotated k and v in the KV cache's pages as well: on a GPU the cache's own write kernel then does not
run (fused.apply_rope_qk dispatches here; the torch fallback is fused.torch_apply_rope_qk).

The kernel keeps the fallback's rounding order: cos/sin in float32 from positions * inv_freq,
times the scaling, rounded to the dtype; each product of the rotation and their sum rounded.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

try:  # Triton is a Linux dependency; without it fused.py never calls in here
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

try:  # the precise cosf/sinf torch uses, on a GPU
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older Triton or none
    libdevice = None

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAVE_TRITON = triton is not None


class KVWrite(NamedTuple):
    """Where RoPE's kernel also stores a layer's new K (rotated) and V: the KV cache's pages
    [num_blocks, block_size, kv_heads, head_dim] and each token's slot, block * block_size +
    offset (-1: padding, not stored)."""
    v: torch.Tensor  # [T, kv_heads, head_dim]
    k_pages: torch.Tensor
    v_pages: torch.Tensor
    slots: torch.Tensor  # int32/int64 [T]


if triton is not None:

    @triton.jit
    def _rope_rotate(x_ptr, out_ptr, t, x_stride_t, x_stride_h, n_heads, half, c, s, page_ptr, page_row, stride_ph,
                     TO_PAGE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        """Token t's heads of x rotated into out (contiguous [T, n_heads, 2 half]) and, with TO_PAGE,
        into the KV page row at page_row (None: the token has no slot) in the page dtype."""
        heads = tl.arange(0, BLOCK_H)[:, None]
        dims = tl.arange(0, BLOCK_D)[None, :]
        mask = (heads < n_heads) & (dims < half)
        src = x_ptr + t * x_stride_t + heads * x_stride_h + dims
        x1 = tl.load(src, mask=mask, other=0.0)
        x2 = tl.load(src + half, mask=mask, other=0.0)
        dtype = x1.dtype
        a1 = x1.to(tl.float32)
        a2 = x2.to(tl.float32)
        # x * cos + cat(-x2, x1) * sin, each product and the sum rounded to the dtype
        o1 = ((a1 * c).to(dtype).to(tl.float32) + (-a2 * s).to(dtype).to(tl.float32)).to(dtype)
        o2 = ((a2 * c).to(dtype).to(tl.float32) + (a1 * s).to(dtype).to(tl.float32)).to(dtype)
        dst = out_ptr + t * n_heads * half * 2 + heads * half * 2 + dims
        tl.store(dst, o1, mask=mask)
        tl.store(dst + half, o2, mask=mask)
        if TO_PAGE:
            row = page_ptr + page_row + heads * stride_ph + dims
            on_page = mask & (page_row >= 0)
            tl.store(row, o1.to(page_ptr.dtype.element_ty), mask=on_page)
            tl.store(row + half, o2.to(page_ptr.dtype.element_ty), mask=on_page)

    @triton.jit
    def _rope_qk_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, inv_freq_ptr, scaling,
                        q_stride_t, q_stride_h, k_stride_t, k_stride_h, n_q_heads, n_k_heads, half,
                        v_ptr, v_stride_t, v_stride_h, slot_ptr, k_pages_ptr, v_pages_ptr, block_size,
                        stride_pb, stride_ps, stride_ph,
                        BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
                        USE_LIBDEVICE: tl.constexpr, WRITE_KV: tl.constexpr):
        """One program a token: q and k rotated; with WRITE_KV also the rotated k and v stored in
        the KV cache's pages [blocks, block_size, kv_heads, head_dim] at the token's slot (-1: none),
        as the cache's own write would (one kernel fewer a layer)."""
        t = tl.program_id(0).to(tl.int64)
        dims = tl.arange(0, BLOCK_D)[None, :]
        pos = tl.load(pos_ptr + t).to(tl.float32)
        inv_freq = tl.load(inv_freq_ptr + dims, mask=dims < half, other=0.0)
        angle = pos * inv_freq
        if USE_LIBDEVICE:  # the precise cosf/sinf torch uses, not the approximate instructions
            cos32 = libdevice.cos(angle)
            sin32 = libdevice.sin(angle)
        else:
            cos32 = tl.cos(angle)
            sin32 = tl.sin(angle)
        dtype = q_ptr.dtype.element_ty
        c = (cos32 * scaling).to(dtype).to(tl.float32)
        s = (sin32 * scaling).to(dtype).to(tl.float32)
        page_row = -1
        if WRITE_KV:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            page_row = tl.where(slot >= 0, (slot // block_size) * stride_pb + (slot % block_size) * stride_ps, -1)
        _rope_rotate(q_ptr, q_out_ptr, t, q_stride_t, q_stride_h, n_q_heads, half, c, s, q_ptr, page_row, 0,
                     False, BLOCK_HQ, BLOCK_D)
        _rope_rotate(k_ptr, k_out_ptr, t, k_stride_t, k_stride_h, n_k_heads, half, c, s, k_pages_ptr, page_row,
                     stride_ph, WRITE_KV, BLOCK_HK, BLOCK_D)
        if WRITE_KV:
            heads = tl.arange(0, BLOCK_HK)[:, None]
            full = tl.arange(0, 2 * BLOCK_D)[None, :]
            live = (heads < n_k_heads) & (full < 2 * half)
            v = tl.load(v_ptr + t * v_stride_t + heads * v_stride_h + full, mask=live)
            tl.store(v_pages_ptr + page_row + heads * stride_ph + full, v.to(v_pages_ptr.dtype.element_ty),
                     mask=live & (page_row >= 0))


def triton_apply_rope_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                         attention_scaling: float, kv_write: KVWrite | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One kernel (one program per token) rotating q [T, heads, D] and k [T, kv_heads, D] into new
    contiguous tensors; cos/sin from positions * inv_freq in float32. kv_write: the rotated k and
    kv_write.v also stored in those pages, at each token's slot (as PagedKVCache.write)."""
    t, n_q, d = q.shape
    n_k = k.shape[1]
    assert k.shape[0] == t and k.shape[2] == d and d % 2 == 0 and k.dtype == q.dtype
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    q_out = torch.empty((t, n_q, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, n_k, d), dtype=k.dtype, device=k.device)
    if kv_write is not None:
        v, k_pages, v_pages, slots = kv_write
        _check_kv_write(k, v, k_pages, v_pages, slots)
        v = v if v.stride(-1) == 1 else v.contiguous()
        pages = dict(v_ptr=v, v_stride_t=v.stride(0), v_stride_h=v.stride(1), slot_ptr=slots, k_pages_ptr=k_pages,
                     v_pages_ptr=v_pages, block_size=k_pages.shape[1], stride_pb=k_pages.stride(0),
                     stride_ps=k_pages.stride(1), stride_ph=k_pages.stride(2))
    else:  # pointers the kernel never reads
        pages = dict(v_ptr=k, v_stride_t=0, v_stride_h=0, slot_ptr=positions, k_pages_ptr=k, v_pages_ptr=k,
                     block_size=1, stride_pb=0, stride_ps=0, stride_ph=0)
    if t:
        half = d // 2
        positions = positions.reshape(-1)
        inv_freq = inv_freq.to(device=q.device, dtype=torch.float32).contiguous()
        use_libdevice = q.is_cuda and libdevice is not None and not _INTERPRETED
        _rope_qk_kernel[(t,)](q, k, q_out, k_out, positions, inv_freq, float(attention_scaling),
                              q.stride(0), q.stride(1), k.stride(0), k.stride(1), n_q, n_k, half, **pages,
                              BLOCK_HQ=triton.next_power_of_2(n_q), BLOCK_HK=triton.next_power_of_2(n_k),
                              BLOCK_D=triton.next_power_of_2(half), USE_LIBDEVICE=use_libdevice,
                              WRITE_KV=kv_write is not None, num_warps=4 if n_q * half >= 1024 else 1)
    return q_out, k_out


def _check_kv_write(k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                    slots: torch.Tensor) -> None:
    """The layout the kernel writes: pages [blocks, block_size, kv_heads, head_dim] alike, rows of
    contiguous heads, one slot a token."""
    _, n_k, d = k.shape
    if v.shape != k.shape or v.dtype != k.dtype:
        raise ValueError(f"v must be k's shape {list(k.shape)} and dtype, got {list(v.shape)} {v.dtype}")
    if k_pages.dim() != 4 or tuple(k_pages.shape[2:]) != (n_k, d) or k_pages.shape != v_pages.shape \
            or k_pages.stride() != v_pages.stride() or k_pages.stride(3) != 1:
        raise ValueError(f"KV pages must both be [blocks, block_size, {n_k}, {d}] with contiguous rows, "
                         f"got {list(k_pages.shape)} and {list(v_pages.shape)}")
    if slots.shape != (k.shape[0],) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be int32/int64 [{k.shape[0]}], got {slots.dtype} {list(slots.shape)}")
