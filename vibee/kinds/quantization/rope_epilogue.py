"""The GEMVs' RoPE epilogue: a one-token QKV projection's output stored as the runtime's RoPE
kernel leaves it (q and k heads rotated, v as it is) and its k and v heads stored in the KV
cache's pages, so that a decode step at batch 1 runs no RoPE kernel and no KV write kernel.
RopeTarget is what the caller gives (QuantLinear.rope_forward, the decoder's rope_linear),
rope_arguments the kernel's arguments for it (or stand-ins the kernel never reads).

Static code: no spec changes it. The quantization and decoder templates copy it (from the marker
below on) into every generated triton module, before the GEMVs that call it (quantization/gemv.py's
_rope_store by whole heads a tile, decoder/kernels.py by rotation pairs).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# ---- copied into generated modules from here ----

try:  # the precise cosf/sinf torch and the runtime's RoPE kernel use on a GPU
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older Triton
    libdevice = None


@triton.jit
def _rope_pairs_store(y1, y2, head, d, live, y_ptr, pos_ptr, inv_freq_ptr, scaling, slot_ptr, k_pages_ptr, v_pages_ptr,
                      block_size, stride_pb, stride_ps, stride_ph, HEAD_DIM: tl.constexpr, Q_HEADS: tl.constexpr,
                      KV_HEADS: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """Rotation pairs of one token's [q heads | k heads | v heads] row: y1 (fp32) at dim d < HEAD_DIM / 2
    of head `head`, y2 at dim d + HEAD_DIM / 2 (any shapes that broadcast; `live` masks pairs past the
    row). Stored into y_ptr as the runtime's RoPE leaves q and k: rounded to y's dtype, then rotated by
    cos/sin of the token's position (times scaling) rounded to the dtype, each product and each sum
    rounded; v heads as they are. The k and v heads also go to the pages [blocks, block_size,
    KV_HEADS, HEAD_DIM] at the token's slot (block * block_size + offset; -1 stores none), in the
    pages' dtype."""
    HALF: tl.constexpr = HEAD_DIM // 2
    dtype = y_ptr.dtype.element_ty
    x1 = y1.to(dtype)
    x2 = y2.to(dtype)
    angle = tl.load(pos_ptr).to(tl.float32) * tl.load(inv_freq_ptr + d)
    if USE_LIBDEVICE:
        cos32 = libdevice.cos(angle)
        sin32 = libdevice.sin(angle)
    else:
        cos32 = tl.cos(angle)
        sin32 = tl.sin(angle)
    c = (cos32 * scaling).to(dtype).to(tl.float32)
    s = (sin32 * scaling).to(dtype).to(tl.float32)
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    rotated = head < Q_HEADS + KV_HEADS
    o1 = tl.where(rotated, ((a1 * c).to(dtype).to(tl.float32) + (-a2 * s).to(dtype).to(tl.float32)).to(dtype), x1)
    o2 = tl.where(rotated, ((a2 * c).to(dtype).to(tl.float32) + (a1 * s).to(dtype).to(tl.float32)).to(dtype), x2)
    out = y_ptr + head * HEAD_DIM + d
    tl.store(out, o1, mask=live)
    tl.store(out + HALF, o2, mask=live)
    slot = tl.load(slot_ptr).to(tl.int64)
    on_page = live & (slot >= 0) & (head >= Q_HEADS)
    kv_head = tl.where(rotated, head - Q_HEADS, head - Q_HEADS - KV_HEADS)
    at = (tl.maximum(slot, 0) // block_size) * stride_pb + (tl.maximum(slot, 0) % block_size) * stride_ps \
        + tl.maximum(kv_head, 0) * stride_ph + d
    is_k = on_page & rotated
    is_v = on_page & ~rotated
    tl.store(k_pages_ptr + at, o1.to(k_pages_ptr.dtype.element_ty), mask=is_k)
    tl.store(k_pages_ptr + at + HALF, o2.to(k_pages_ptr.dtype.element_ty), mask=is_k)
    tl.store(v_pages_ptr + at, o1.to(v_pages_ptr.dtype.element_ty), mask=is_v)
    tl.store(v_pages_ptr + at + HALF, o2.to(v_pages_ptr.dtype.element_ty), mask=is_v)


@dataclass(frozen=True)
class RopeTarget:
    """A one-token QKV projection's RoPE and KV store: the token's position, the rotation's
    float32 inverse frequencies [head_dim / 2] and cos/sin factor, the heads of the projection's
    output ([q_heads | kv_heads | kv_heads] of head_dim rows), the token's slot and the KV pages
    [blocks, block_size, kv_heads, head_dim] its k and v heads go to."""

    positions: torch.Tensor  # [1]
    inv_freq: torch.Tensor
    scaling: float
    q_heads: int
    kv_heads: int
    head_dim: int
    slots: torch.Tensor  # int32/int64 [1]; -1: none
    k_pages: torch.Tensor
    v_pages: torch.Tensor


def rope_fits(rope: RopeTarget, out_features: int) -> bool:
    """Whether an epilogue can store this projection's output: an even head_dim, the output exactly
    the heads, pages of the layout it writes, one token."""
    d = rope.head_dim
    pages = rope.k_pages
    return (d >= 2 and d % 2 == 0 and out_features == (rope.q_heads + 2 * rope.kv_heads) * d
            and pages.dim() == 4 and tuple(pages.shape[2:]) == (rope.kv_heads, d) and pages.stride(3) == 1
            and rope.v_pages.shape == pages.shape and rope.v_pages.stride() == pages.stride()
            and rope.positions.numel() == 1 and rope.slots.numel() == 1 and rope.inv_freq.numel() == d // 2)


def rope_arguments(rope: RopeTarget | None, y: torch.Tensor) -> dict:
    """The GEMV's RoPE arguments: rope's, or (None) stand-ins the kernel never reads."""
    if rope is None:
        return dict(pos_ptr=y, inv_freq_ptr=y, scaling=1.0, slot_ptr=y, k_pages_ptr=y, v_pages_ptr=y, block_size=1,
                    stride_pb=0, stride_ps=0, stride_ph=0, ROPE=False, HEAD_DIM=2, Q_HEADS=1, KV_HEADS=1,
                    USE_LIBDEVICE=False)
    pages = rope.k_pages
    return dict(pos_ptr=rope.positions, inv_freq_ptr=rope.inv_freq.to(device=y.device, dtype=torch.float32).contiguous(),
                scaling=float(rope.scaling), slot_ptr=rope.slots, k_pages_ptr=pages, v_pages_ptr=rope.v_pages,
                block_size=pages.shape[1], stride_pb=pages.stride(0), stride_ps=pages.stride(1),
                stride_ph=pages.stride(2), ROPE=True, HEAD_DIM=rope.head_dim, Q_HEADS=rope.q_heads,
                KV_HEADS=rope.kv_heads, USE_LIBDEVICE=y.is_cuda and libdevice is not None)
