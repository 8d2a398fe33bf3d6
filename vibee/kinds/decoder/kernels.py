"""The decoder kind's Triton kernels: add + RMSNorm, SiLU * up, and the one-token GEMV of 16-bit
weights (plain; for a merged gate_up projection multiplying silu(gate) * up in its epilogue; for
a QKV projection storing its output as RoPE leaves it and its K/V in the cache's pages).

Static code: no spec changes it. The decoder's triton template copies it (from the marker below on)
into the generated module after quantization/silu_mul.py and rope_epilogue.py; the spec's tables
pick the constexprs and warps of each launch.

The kernels keep the torch expressions' rounding order: float32 math, rounded to the input dtype
where torch rounds (after the residual add, after the normalisation before the weight, silu before
the multiply). What can differ is the order of the float32 sums and the last bit of rsqrt and exp.
"""

import triton
import triton.language as tl

from vibee.kinds.quantization.rope_epilogue import _rope_pairs_store
from vibee.kinds.quantization.silu_mul import _silu_times_up

# ---- copied into generated modules from here ----


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, h_ptr, n_cols, x_stride, res_stride, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row: h = x + residual (rounded as torch's add), out = w * normalised(h)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        h = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(h_ptr + row * n_cols + cols, h, mask=mask)
    else:
        h = x
    h32 = h.to(tl.float32)
    mean_sq = tl.sum(h32 * h32, axis=0) / n_cols
    normed = (h32 * tl.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * n_cols + cols, out, mask=mask)


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n_cols, gate_stride, up_stride, BLOCK: tl.constexpr):
    """Grid (rows, column blocks); gate and up rows may be strided (the halves of gate_up)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gate_ptr + row * gate_stride + cols, mask=mask, other=0.0)
    u = tl.load(up_ptr + row * up_stride + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * n_cols + cols, _silu_times_up(g, u), mask=mask)


@triton.jit
def _gemv_dot(x_ptr, w_ptr, rn, K, stride_wn, EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum_k w[rn, k] x[k] (fp32) for the BLOCK_N rows rn. Each lane keeps [BLOCK_N, BLOCK_K] float32
    partial sums, added up after the loop."""
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        if EVEN:
            w = tl.load(w_ptr + rn[:, None] * stride_wn + k[None, :])
            a = tl.load(x_ptr + k)
        else:
            w = tl.load(w_ptr + rn[:, None] * stride_wn + k[None, :], mask=(k < K)[None, :], other=0.0)
            a = tl.load(x_ptr + k, mask=k < K, other=0.0)
        acc += w.to(tl.float32) * a.to(tl.float32)[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_wn, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[n] = sum_k w[n, k] x[k] + bias[n] for BLOCK_N rows."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rn = tl.where(n_mask, rn, 0).to(tl.int64)  # rows past N read row 0 and are not stored
    y = _gemv_dot(x_ptr, w_ptr, rn, K, stride_wn, EVEN, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _gemv_rope_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_wn, pos_ptr, inv_freq_ptr, scaling, slot_ptr,
                      k_pages_ptr, v_pages_ptr, block_size, stride_pb, stride_ps, stride_ph, HAS_BIAS: tl.constexpr,
                      EVEN: tl.constexpr, PAIRS: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr,
                      Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """One token's QKV projection, y = w @ x + bias, stored as RoPE leaves it, with its k and v heads
    in the KV pages (rope_epilogue.py's _rope_pairs_store). A program takes PAIRS rotation pairs
    (row d of a head with row d + HEAD_DIM / 2, whatever the head's kind), 2 * PAIRS weight rows
    interleaved, so that it rotates what it computed: the grid is the plain GEMV's, no program waits
    for another, and the step runs no RoPE kernel."""
    HALF: tl.constexpr = HEAD_DIM // 2
    pair = tl.program_id(0) * PAIRS + tl.arange(0, PAIRS)
    live = pair < N // 2
    pair = tl.where(live, pair, 0)
    head = pair // HALF
    d = pair % HALF
    row1 = (head * HEAD_DIM + d).to(tl.int64)
    rn = tl.reshape(tl.join(row1, row1 + HALF), [2 * PAIRS])  # row1[0], its partner, row1[1], ...
    y = _gemv_dot(x_ptr, w_ptr, rn, K, stride_wn, EVEN, 2 * PAIRS, BLOCK_K)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn).to(tl.float32)
    y1, y2 = tl.split(tl.reshape(y, [PAIRS, 2]))
    _rope_pairs_store(y1, y2, head, d, live, y_ptr, pos_ptr, inv_freq_ptr, scaling, slot_ptr, k_pages_ptr,
                      v_pages_ptr, block_size, stride_pb, stride_ps, stride_ph, HEAD_DIM, Q_HEADS, KV_HEADS,
                      USE_LIBDEVICE)


@triton.jit
def _gemv_silu_mul_kernel(x_ptr, w_ptr, b_ptr, y_ptr, INNER, K, stride_wn, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,
                          PAIRS: tl.constexpr, BLOCK_K: tl.constexpr):
    """One token's MLP input, y[j] = silu(gate[j]) * up[j] for [gate | up] = w @ x + bias (w of
    2 * INNER rows), each half rounded to y's dtype first as the linear layer's output is, then as
    silu_mul rounds. A program takes PAIRS of rows (j, INNER + j), interleaved, so that it multiplies
    what it computed: the down projection's GEMV then reads a plain input, not [gate | up] with
    silu worked out again by every program."""
    j = tl.program_id(0) * PAIRS + tl.arange(0, PAIRS)
    live = j < INNER
    j = tl.where(live, j, 0).to(tl.int64)
    rn = tl.reshape(tl.join(j, j + INNER), [2 * PAIRS])  # gate row j, up row j, gate row j + 1, ...
    y = _gemv_dot(x_ptr, w_ptr, rn, K, stride_wn, EVEN, 2 * PAIRS, BLOCK_K)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn).to(tl.float32)
    gate, up = tl.split(tl.reshape(y, [PAIRS, 2]))
    dtype = y_ptr.dtype.element_ty
    tl.store(y_ptr + j, _silu_times_up(gate.to(dtype), up.to(dtype)), mask=live)
