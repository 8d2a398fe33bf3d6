"""RoPE's Triton kernel: q and k of a step rotated (rotate-half pairs (i, i + D/2)) in one program
a token, cos/sin computed from positions * inv_freq in float32 inside it, and optionally the
rotated k and v stored in the KV cache's pages as the cache's own write would store them (one
kernel fewer a layer).

Static code: no spec changes it. The decoder's triton template copies it (from the marker below on)
into the generated module; the spec's rope_warps table picks each launch's warps. It keeps the
torch expressions' rounding: cos/sin rounded to the dtype before the rotation, each product of the
rotation and their sum rounded; libdevice's cosf/sinf on a GPU, as torch computes them.
"""

import triton
import triton.language as tl

try:  # the precise cosf/sinf torch uses, on a GPU
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older Triton
    libdevice = None

# ---- copied into generated modules from here ----


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
