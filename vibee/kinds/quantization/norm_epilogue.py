"""The GEMV's add + RMSNorm epilogue: a one-token projection whose output joins the residual
stream (o_proj, down_proj) also works out the norm after it, so that a decode step at batch 1
runs no norm kernel between its projections. The last program of the grid to store its rows
adds the whole row to the residual and normalises it, with the runtime's rms_norm arithmetic.
NormTarget is what the caller gives (QuantLinear.add_norm_forward), norm_arguments the kernel's
arguments for it (or stand-ins the kernel never reads).

Static code: no spec changes it. The quantization templates copy it (from the marker below on)
into every generated triton module before gemv.py.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# ---- copied into generated modules from here ----

# The row is normalised in chunks of at most this many values: one chunk holds 16 fp32 values a
# thread of 4 warps, so the tail never needs more registers than the GEMV's loop.
NORM_CHUNK = 2048


@triton.jit
def _add_norm_tail(y_ptr, N, res_ptr, norm_w_ptr, eps, h_ptr, out_ptr, grid_count_ptr, tiles,
                   NORM_BLOCK: tl.constexpr):
    """Called by each program after it stored its rows of y: the last of the grid's `tiles` row
    tiles to get here (a counter, put back to 0) reads the whole row y [N] from L2, stores
    h = y + residual rounded to y's dtype and out = weight * normalised(h), as the runtime's
    rms_norm kernel computes them: the sum of squares of h in fp32, h * 1/sqrt(mean + eps)
    rounded to the dtype, times the weight. A row over NORM_BLOCK is summed chunk by chunk."""
    tl.debug_barrier()  # every thread's store of y before the counter's release
    finished = tl.atomic_add(grid_count_ptr, 1, sem="acq_rel", scope="gpu")
    if finished == tiles - 1:
        dtype = y_ptr.dtype.element_ty
        sum_sq = tl.zeros([NORM_BLOCK], dtype=tl.float32)
        for c0 in range(0, N, NORM_BLOCK):  # .cg: from L2, where the other programs' rows are
            cols = c0 + tl.arange(0, NORM_BLOCK)
            mask = cols < N
            y = tl.load(y_ptr + cols, mask=mask, other=0.0, cache_modifier=".cg")
            r = tl.load(res_ptr + cols, mask=mask, other=0.0)
            h = (y.to(tl.float32) + r.to(tl.float32)).to(dtype)
            tl.store(h_ptr + cols, h, mask=mask)
            sum_sq += h.to(tl.float32) * h.to(tl.float32)
        inv_rms = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(sum_sq, axis=0) / N + eps))
        for c0 in range(0, N, NORM_BLOCK):  # h again from y and the residual: no store to read back
            cols = c0 + tl.arange(0, NORM_BLOCK)
            mask = cols < N
            y = tl.load(y_ptr + cols, mask=mask, other=0.0, cache_modifier=".cg")
            r = tl.load(res_ptr + cols, mask=mask, other=0.0)
            h = (y.to(tl.float32) + r.to(tl.float32)).to(dtype)
            normed = (h.to(tl.float32) * inv_rms).to(dtype)
            w = tl.load(norm_w_ptr + cols, mask=mask, other=0.0)
            tl.store(out_ptr + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(grid_count_ptr, 0)


@dataclass(frozen=True)
class NormTarget:
    """The add + RMSNorm after a one-row projection: the residual stream [N] the output joins, the
    norm's weight [N] and eps, and where the new stream h and the normalised row go ([N] each)."""

    residual: torch.Tensor
    weight: torch.Tensor
    eps: float
    h: torch.Tensor
    out: torch.Tensor


def norm_takes(norm: NormTarget, out_features: int, dtype: torch.dtype) -> bool:
    """Whether the epilogue can do this norm: every tensor one contiguous row of the projection's
    outputs in its dtype (the runtime's norm rounds to x's dtype and multiplies in the weight's)."""
    return all(t.numel() == out_features and t.dtype == dtype and t.is_contiguous()
               for t in (norm.residual, norm.weight, norm.h, norm.out))


def norm_arguments(norm: NormTarget | None, y: torch.Tensor, counters: torch.Tensor, tiles: int) -> dict:
    """The GEMV's add + RMSNorm arguments: norm's (the grid's counter is counters[tiles], after the
    row tiles' own), or (None) stand-ins the kernel never reads."""
    if norm is None:
        return dict(res_ptr=y, norm_w_ptr=y, eps=0.0, h_ptr=y, normed_ptr=y, grid_count_ptr=y, ADD_NORM=False, NORM_BLOCK=1)
    return dict(res_ptr=norm.residual, norm_w_ptr=norm.weight, eps=float(norm.eps), h_ptr=norm.h, normed_ptr=norm.out,
                grid_count_ptr=counters[tiles:], ADD_NORM=True,
                NORM_BLOCK=min(triton.next_power_of_2(y.shape[-1]), NORM_CHUNK))
