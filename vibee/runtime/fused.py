"""Fused ops of the decoder layer: add + RMSNorm, RoPE on q and k (its kernel in rope_kernel.py,
optionally storing the rotated k and v in the KV cache's pages), SiLU * mul, and a one-token GEMV
(optionally with SiLU * mul fused into its input).

A decode step of a small model is bound by kernel launches, not by its weights: RMSNorm in
float32 is about seven elementwise kernels, RoPE about ten for q and k, SiLU * up two, plus the
residual adds. Each op here is one Triton kernel on CUDA tensors, with a torch fallback (the
model's previous code, kept as it was) used on every other device, so CPU results do not change
(also under TRITON_INTERPRET=1: the interpreter is only reached through the `triton_*` launchers,
which tests call directly).

The kernels keep the fallback's rounding order: float32 math, rounded to the input dtype where
the torch code rounds (after the residual add, after the normalisation before the weight, cos/sin
before the rotation, each product of the rotation, silu before the multiply). What can differ is
the order of the float32 sum of squares and the last bit of rsqrt/cos/sin/exp.

The GEMV is for one-token steps (batch-1 decode) with unquantized weights: there each linear
layer reads its whole weight for one row of x, and on an H100 a Triton GEMV with small row tiles
beat cuBLAS at every Llama-3.2-1B projection (weights cold in L2: 3-30% faster), and taking
silu(gate) * up as its input saves the down projection's separate elementwise kernel. Its sum
runs in float32 in another order than cuBLAS's, so results agree to the output's rounding.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from vibee.runtime.rope_kernel import KVWrite, triton_apply_rope_qk

try:  # Triton is a Linux dependency; without it everything runs on the torch fallbacks
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = ["rms_norm", "apply_rope_qk", "silu_mul", "linear", "silu_mul_linear", "torch_rms_norm", "torch_apply_rope_qk",
           "torch_silu_mul", "rope_cos_sin", "triton_rms_norm", "triton_apply_rope_qk", "triton_silu_mul", "triton_gemv",
           "HAVE_TRITON", "KVWrite"]

HAVE_TRITON = triton is not None


def _use_triton(x: torch.Tensor) -> bool:
    return HAVE_TRITON and x.is_cuda


# ---- torch fallbacks (the model's numerics) -------------------------------------------------


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * normalised(h), h) with h = x + residual (or x when residual is None)."""
    h = x if residual is None else x + residual
    h32 = h.float()
    h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h32.to(h.dtype), h


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, 1, head_dim] for the tokens' positions, computed in float32, cast to dtype."""
    freqs = positions.float().unsqueeze(1) * inv_freq.unsqueeze(0)
    angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
    return (angles.cos() * attention_scaling).to(dtype), (angles.sin() * attention_scaling).to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def torch_apply_rope_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                        attention_scaling: float,
                        cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, heads, D] and k [T, kv_heads, D] rotated (pairs (i, i + D/2)); new tensors.
    cos_sin: the rope_cos_sin of these positions when the caller already has them."""
    cos, sin = cos_sin if cos_sin is not None else rope_cos_sin(positions, inv_freq, attention_scaling, q.dtype)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def torch_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# ---- dispatch -------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Add + RMSNorm over the last dim: h = x + residual (in x's dtype; h = x without a residual),
    out = weight * (h.float() * rsqrt(mean(h.float()^2) + eps)).to(dtype). Returns (out, h)."""
    if _use_triton(x):
        return triton_rms_norm(x, weight, eps, residual)
    return torch_rms_norm(x, weight, eps, residual)


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                  attention_scaling: float, cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
                  kv_write: KVWrite | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (rotate-half) on q [T, heads, D] and k [T, kv_heads, D]; returns new (q, k).
    On CUDA one kernel computes cos/sin itself (cos_sin is ignored), and stores the rotated k and
    kv_write.v in kv_write's pages where one is given (only on CUDA: elsewhere it is an error)."""
    if _use_triton(q):
        return triton_apply_rope_qk(q, k, positions, inv_freq, attention_scaling, kv_write)
    if kv_write is not None:
        raise ValueError("apply_rope_qk writes K/V pages only on CUDA (the KV cache's write does it elsewhere)")
    return torch_apply_rope_qk(q, k, positions, inv_freq, attention_scaling, cos_sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, silu rounded to the dtype before the multiply (as F.silu(gate) * up)."""
    if _use_triton(gate):
        return triton_silu_mul(gate, up)
    return torch_silu_mul(gate, up)


def _gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One row of x, on CUDA, in the weight's 16-bit dtype: the case the GEMV kernel is for."""
    return (_use_triton(x) and x.numel() == x.shape[-1] and x.dtype == weight.dtype
            and weight.dtype in (torch.bfloat16, torch.float16) and weight.stride(-1) == 1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); a one-token step on CUDA takes the Triton GEMV."""
    if _gemv_applies(x, weight):
        return triton_gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(silu_mul(gate, up), weight, bias) for gate_up = cat(gate, up) along the last dim;
    a one-token step on CUDA computes silu(gate) * up inside the GEMV's loads."""
    if _gemv_applies(gate_up, weight) and gate_up.shape[-1] == 2 * weight.shape[1]:
        return triton_gemv(gate_up, weight, bias, silu_mul_input=True)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.linear(silu_mul(gate, up), weight, bias)


# ---- Triton kernels -------------------------------------------------------------------------

if HAVE_TRITON:

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, h_ptr, n_cols, x_stride, res_stride, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
            h = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the add, rounded as torch's
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
        g32 = g.to(tl.float32)
        silu = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype)
        out = (silu.to(tl.float32) * u.to(tl.float32)).to(g.dtype)
        tl.store(out_ptr + row * n_cols + cols, out, mask=mask)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_wn, SILU_MUL: tl.constexpr, HAS_BIAS: tl.constexpr,
                     EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y[n] = sum_k w[n, k] a[k] + bias[n] for BLOCK_N rows, a = x, or with SILU_MUL
        a = silu(x[:K]) * x[K:] rounded as silu_mul rounds. Each lane keeps [BLOCK_N, BLOCK_K]
        float32 partial sums, added up after the loop."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        rn = tl.where(n_mask, rn, 0).to(tl.int64)  # rows past N read row 0 and are not stored
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + rk
            if EVEN:
                w = tl.load(w_ptr + rn[:, None] * stride_wn + k[None, :])
                a = tl.load(x_ptr + k)
                if SILU_MUL:
                    up = tl.load(x_ptr + K + k)
            else:
                w = tl.load(w_ptr + rn[:, None] * stride_wn + k[None, :], mask=(k < K)[None, :], other=0.0)
                a = tl.load(x_ptr + k, mask=k < K, other=0.0)
                if SILU_MUL:
                    up = tl.load(x_ptr + K + k, mask=k < K, other=0.0)
            if SILU_MUL:
                g32 = a.to(tl.float32)
                silu = (g32 / (1.0 + tl.exp(-g32))).to(a.dtype)
                a = (silu.to(tl.float32) * up.to(tl.float32)).to(a.dtype)
            acc += w.to(tl.float32) * a.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rn).to(tl.float32)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, features] with unit stride along features (a view when it can be one)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The add + RMSNorm kernel, one program per row; (out, h) as new contiguous tensors
    (h is x itself when there is no residual)."""
    n = x.shape[-1]
    x2 = _rows(x)
    rows = x2.shape[0]
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty((rows, n), dtype=out_dtype, device=x.device)
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, "residual must match x"
        r2 = _rows(residual)
        h = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    else:
        r2, h = x2, x
    if rows:
        block = triton.next_power_of_2(n)
        warps = 1 if block <= 512 else 4 if block <= 4096 else 8
        _rms_norm_kernel[(rows,)](x2, r2, weight, out, h if residual is not None else x2, n,
                                  x2.stride(0), r2.stride(0), float(eps),
                                  HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=warps)
    if residual is not None:
        h = h.view(x.shape)
    return out.view(x.shape), h


def triton_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in one elementwise kernel; a new contiguous tensor of gate's shape. Rows
    may be strided (the two halves of a merged gate_up output are read in place, not copied)."""
    assert gate.shape == up.shape and gate.dtype == up.dtype
    n = gate.shape[-1]
    gate2, up2 = _rows(gate), _rows(up)
    rows = gate2.shape[0]
    out = torch.empty((rows, n), dtype=gate.dtype, device=gate.device)
    if rows and n:
        block = min(1024, triton.next_power_of_2(n))
        _silu_mul_kernel[(rows, triton.cdiv(n, block))](gate2, up2, out, n, gate2.stride(0), up2.stride(0),
                                                        BLOCK=block, num_warps=4)
    return out.view(gate.shape)


def triton_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                silu_mul_input: bool = False) -> torch.Tensor:
    """x [..., K] (one row) @ weight[N, K].T + bias -> [..., N] in x's dtype; silu_mul_input: x is
    [..., 2K] = cat(gate, up) and the kernel multiplies by silu(gate) * up. Tiles from an H100
    sweep at Llama-3.2-1B's projections: 4 rows (8 from 8,192 rows up) by 512 inputs, no split
    (a few hundred programs or more already), 8 warps for 8,192 inputs and more."""
    n, k = weight.shape
    assert x.shape[-1] == (2 * k if silu_mul_input else k) and x.numel() == x.shape[-1], "one row of x"
    x1 = x.reshape(-1)
    if x1.stride(0) != 1:
        x1 = x1.contiguous()
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    block_n, block_k = (4 if n <= 4096 else 8), 512
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x1, weight, bias if bias is not None else weight, y, n, k, weight.stride(0),
        SILU_MUL=silu_mul_input, HAS_BIAS=bias is not None, EVEN=k % block_k == 0,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8 if k >= 8192 else 4, num_stages=3)
    return y.view(*x.shape[:-1], n)
