"""The fp8 (W8A8) quantized matmul's Triton kernels: y = (x rounded to fp8 per row) @ w.T with
fp32 accumulation, scaled per row and per output channel, for a code_type fp8 module.

Static code. The quantization templates copy it (from the marker below on) into a generated
triton module whose code_type is fp8, after fp8_rounding.py and silu_mul.py, so that module stands
alone; that module defines FP8_TILES and TRITON_MAX_ROWS from the spec (fp8_tiles,
fp8_triton_max_rows). Imported from here, the defaults below stand in for them.
"""

import weakref

import torch
import triton
import triton.language as tl

from vibee.kinds.quantization.fp8_rounding import _e4m3
from vibee.kinds.quantization.silu_mul import _silu_times_up
from vibee.kinds.quantization.tile_order import _program_tile
from vibee.kinds.quantization.tiles import FP8_TRITON_MAX_ROWS, measured_fp8_tiles

FP8_TILES = tuple(tile.launch() for tile in measured_fp8_tiles())
TRITON_MAX_ROWS = FP8_TRITON_MAX_ROWS

# ---- copied into generated modules from here ----

@triton.jit
def _row_input(x_ptr, m, k, K, stride_xm, SILU_MUL: tl.constexpr):
    """x[m, k] in fp32 (0 past K); SILU_MUL: row m is [gate | up] and the value is silu(gate) * up,
    each rounded to x's dtype as the runtime's silu_mul rounds (silu before the multiply)."""
    v = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0)
    if SILU_MUL:
        up = tl.load(x_ptr + m * stride_xm + K + k, mask=k < K, other=0.0)
        v = _silu_times_up(v, up)
    return v.to(tl.float32)


@triton.jit
def _fp8_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                     SILU_MUL: tl.constexpr):
    """Row m of x as fp8: s[m] = max|x[m]| / 448 (1 for a row of zeros), q[m] = x[m] / s[m] on
    e4m3's grid. ONE_PASS (BLOCK covers the row): the row is read once and kept in registers.
    SILU_MUL: x's rows are [gate | up] (2K) and the row rounded is silu(gate) * up (_row_input)."""
    m = tl.program_id(0).to(tl.int64)
    if ONE_PASS:
        k = tl.arange(0, BLOCK)
        x = _row_input(x_ptr, m, k, K, stride_xm, SILU_MUL)
        top = tl.max(tl.abs(x), axis=0)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            amax = tl.maximum(amax, tl.abs(_row_input(x_ptr, m, k, K, stride_xm, SILU_MUL)))
        top = tl.max(amax, axis=0)
    scale = tl.where(top > 0, tl.math.div_rn(top, 448.0), 1.0)
    tl.store(s_ptr + m, scale)
    if ONE_PASS:
        q = _e4m3(tl.clamp(tl.math.div_rn(x, scale), -448.0, 448.0))
        tl.store(q_ptr + m * stride_qm + k, q.to(q_ptr.dtype.element_ty), mask=k < K)
    else:
        for k0 in range(0, K, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            x = _row_input(x_ptr, m, k, K, stride_xm, SILU_MUL)
            q = _e4m3(tl.clamp(tl.math.div_rn(x, scale), -448.0, 448.0))
            tl.store(q_ptr + m * stride_qm + k, q.to(q_ptr.dtype.element_ty), mask=k < K)


@triton.jit(do_not_specialize=["M"])
def _fp8_mm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, y_ptr, part_ptr, M, N, K, stride_am, stride_bn, stride_ym,
                   k_per_split, HAS_BIAS: tl.constexpr, PARTIALS: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """A [BLOCK_M, BLOCK_N] tile of y = (a @ b.T) * sa[:, None] * sb[None, :] + bias: a [M, K] and
    b [N, K] fp8 (both K-major, as fp8 tensor cores take them), fp32 accumulation, the scales in
    the epilogue. Tiles in column bands of GROUP_M row tiles, for L2 reuse of b. PARTIALS: program
    (tile, s) sums split s of k into part[s] (fp32, unscaled); _fp8_reduce_kernel finishes y."""
    rm, rn, m_mask, n_mask, rm_safe, rn_safe, k_begin, k_end = _program_tile(M, N, K, k_per_split, BLOCK_M, BLOCK_N,
                                                                             GROUP_M)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_mask = (k0 + rk) < k_end
        a = tl.load(a_ptr + rm_safe[:, None] * stride_am + (k0 + rk)[None, :], mask=k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + rn_safe[:, None] * stride_bn + (k0 + rk)[None, :], mask=k_mask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
    mask = m_mask[:, None] & n_mask[None, :]
    if PARTIALS:
        tl.store(part_ptr + (tl.program_id(1) * M + rm_safe[:, None]) * N + rn[None, :], acc, mask=mask)
    else:
        sa = tl.load(sa_ptr + rm_safe)
        sb = tl.load(sb_ptr + rn_safe).to(tl.float32)
        y = acc * sa[:, None] * sb[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn_safe).to(tl.float32)[None, :]
        tl.store(y_ptr + rm_safe[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _fp8_reduce_kernel(part_ptr, sa_ptr, sb_ptr, bias_ptr, y_ptr, M, N, stride_ym, SPLIT: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y = (sum of the SPLIT partials, in split order) * sa[m] * sb[n] + bias[n]."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = i < M * N
    m, n = i // N, i % N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(part_ptr + s * M * N + i, mask=valid, other=0.0)
    y = acc * tl.load(sa_ptr + m, mask=valid, other=0.0) * tl.load(sb_ptr + n, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + n, mask=valid, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + n, y.to(y_ptr.dtype.element_ty), mask=valid)


def fp8_rows(x: torch.Tensor, silu_mul: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (its rows in fp8 [M, K], their float32 scales [M]): x ~ q * s[:, None].
    silu_mul: x is [M, 2K], rows [gate | up], and the rows rounded are silu(gate) * up."""
    m, k = x.shape[0], x.shape[1] // 2 if silu_mul else x.shape[1]
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        block = triton.next_power_of_2(k)
        one_pass = block <= ONE_PASS_MAX
        block = block if one_pass else 1024
        _fp8_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK=block, ONE_PASS=one_pass, SILU_MUL=silu_mul,
                               num_warps=8 if block >= 4096 else 4)
    return q, s


ONE_PASS_MAX = 16384  # the longest row fp8_rows keeps in registers (64 fp32 a thread on 8 warps)


def fp8_tile(m: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a product with m activation rows:
    the first row of FP8_TILES whose max_m (None: any) is at least m."""
    for max_m, *launch in FP8_TILES:
        if max_m is None or m <= max_m:
            return tuple(launch)
    raise ValueError(f"no row of FP8_TILES takes {m} rows: the last row must have no max_m")


def fp8_split(tiles: int, k: int, block_k: int, device: torch.device) -> int:
    """Splits of k that bring the grid near two programs per SM (at most 8, each split at least
    4 tiles of k): few rows make few tiles, and one SM cannot stream a weight's share alone."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    split = 1
    while tiles * split * 2 <= 2 * sms and split < 8 and k // (block_k * split * 2) >= 4:
        split *= 2
    return split


def fp8_launch_rows(max_rows: int, n: int, k: int, device: torch.device) -> list[int]:
    """The fewest rows of each distinct launch (tile and split) of the Triton kernel for [m, k] @
    [k, n] products of 1..max_rows rows (it compiles once per launch, whatever m is)."""
    first: dict[tuple, int] = {}
    for m in range(1, max_rows + 1):
        block_m, block_n, block_k, warps, stages = fp8_tile(m)
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        first.setdefault((block_m, block_n, block_k, warps, stages, fp8_split(tiles, k, block_k, device)), m)
    return sorted(first.values())


_ROWWISE: dict[torch.device, bool] = {}  # whether torch._scaled_mm takes row-wise scales on this device
_FP32_SCALES: dict[int, tuple[weakref.ref, torch.Tensor]] = {}  # id(scales) -> (the scales, their float32 row)


def _fp32_scales(scales: torch.Tensor) -> torch.Tensor:
    """scales [N, 1] as a float32 [1, N] row (what cuBLASLt takes), made once per weight: the
    first call of a layer runs eagerly (the engine's warm-up) before any CUDA graph captures it.
    Keyed by identity (a tensor's == is elementwise), checked against a reused id by a weak reference."""
    hit = _FP32_SCALES.get(id(scales))
    if hit is not None and hit[0]() is scales:
        return hit[1]
    row = scales.reshape(1, -1).float().contiguous()
    _FP32_SCALES[id(scales)] = (weakref.ref(scales), row)
    return row


def triton_takes(m: int, n: int, k: int, device: torch.device) -> bool:
    """Whether the Triton kernel runs an [m, k] @ [k, n] product where cuBLASLt's row-wise fp8 GEMM
    could: up to TRITON_MAX_ROWS rows, and up to 16 rows a split where fp8_split splits k at least
    4 ways (a narrow weight: cuBLASLt does not split k, so its 128x128 tiles leave SMs idle).
    H100, 2026-12-06, each call over copies of the weight, fp8_rows included: Triton / cuBLASLt us
    at 32, 64, 128, 256 rows: 3072x2048 (4 splits) 9.8/11.3, 10.4/11.4, 13.5/11.6, 19.6/11.8;
    2048x8192 (8 splits) 14.6/25.9, 15.6/26.1, 18.4/26.4, 29.4/27.2; 16384x2048 (2 splits)
    21.2/19.1 at 32 rows (cuBLASLt also ahead at 64-256); 128256x2048 (1 split) 98.2/104.2 at 32
    rows, 120.3/109.0 at 128."""
    if m <= TRITON_MAX_ROWS:
        return True
    block_m, block_n, block_k, _, _ = fp8_tile(m)
    split = fp8_split(triton.cdiv(m, block_m) * triton.cdiv(n, block_n), k, block_k, device)
    return split >= 4 and m <= 16 * split


def cublas_fp8(q: torch.Tensor, s: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor | None:
    """(q @ qweight.T) * s[:, None] * scales.T on cuBLASLt's fp8 GEMM (torch._scaled_mm, row-wise
    scales, fp32 accumulation), or None where this torch, GPU or shape has no such kernel (then
    the Triton kernel runs). It beats the Triton kernel on Hopper where triton_takes says no."""
    device = q.device
    if device.type != "cuda" or _ROWWISE.get(device) is False or dtype != torch.bfloat16:
        return None
    if q.shape[1] % 16 or qweight.shape[0] % 16:
        return None
    try:
        y = torch._scaled_mm(q, qweight.t(), scale_a=s.reshape(-1, 1), scale_b=_fp32_scales(scales), out_dtype=dtype)
    except (RuntimeError, TypeError, AttributeError):
        _ROWWISE[device] = False
        return None
    _ROWWISE[device] = True
    return y


def fp8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
               split: int | None = None, cublas: bool = True, silu_mul: bool = False,
               tile: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """x [..., K] @ (qweight * scales).T + bias with x rounded to fp8 per row (W8A8): qweight
    [N, K] float8_e4m3fn, scales [N, 1] one per output channel. Returned in x's dtype. split:
    splits of k of the Triton kernel (None: fp8_split's); cublas: cuBLASLt's fp8 GEMM where
    triton_takes says no and it runs (bf16 on a GPU that has it), else the Triton kernel.
    silu_mul: x is [..., 2K], [gate | up], and the product is with silu(gate) * up (rounded with
    the rows: no elementwise kernel before it). tile: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
    num_stages) on the Triton kernel in place of fp8_tile's (`vibee bench tiles --quant fp8`
    times candidates so)."""
    lead, k = x.shape[:-1], qweight.shape[1]
    n = qweight.shape[0]
    if x.shape[-1] != (2 * k if silu_mul else k):
        twice = " (twice that with silu_mul: gate and up)" if silu_mul else ""
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {k}{twice}")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if not x2.shape[0]:
        return x.new_empty(*lead, n)
    q, s = fp8_rows(x2, silu_mul)
    use_cublas = cublas and split is None and tile is None and not triton_takes(x2.shape[0], n, k, x.device)
    y = cublas_fp8(q, s, qweight, scales, x.dtype) if use_cublas else None
    if y is not None:
        if bias is not None:
            y += bias
        return y.reshape(*lead, n)
    y = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    m = x2.shape[0]
    block_m, block_n, block_k, warps, stages = fp8_tile(m) if tile is None else tile
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = fp8_split(tiles, k, block_k, x.device) if split is None else split
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_per_split)
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else y
    sb = scales.reshape(-1)
    b = bias if bias is not None else s
    _fp8_mm_kernel[(tiles, split)](
        q, qweight, s, sb, b, y, part, m, n, k, q.stride(0), qweight.stride(0), y.stride(0), k_per_split,
        HAS_BIAS=bias is not None, PARTIALS=split > 1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=8, num_warps=warps, num_stages=stages,
    )
    if split > 1:
        _fp8_reduce_kernel[(triton.cdiv(m * n, 1024),)](part, s, sb, b, y, m, n, y.stride(0), SPLIT=split,
                                                         HAS_BIAS=bias is not None, BLOCK=1024, num_warps=4)
    return y.reshape(*lead, n)
