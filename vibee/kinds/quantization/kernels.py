"""The quantized matmul's Triton kernels: y = x @ dequantize(qw).T + bias without a dense weight.

Static code: no spec changes it. It is importable and lint-able here, and the quantization
templates copy it (from the marker below on) into every generated triton module, so a generated
module stands alone. Launch shapes are arguments (constexprs) that launch.py picks from the spec's
tile table.
"""

import triton
import triton.language as tl

from vibee.kinds.quantization.tile_order import _program_tile
from vibee.kinds.quantization.unpack import _half16, _packed_pairs, _weight_tile

# ---- copied into generated modules from here ----

# Every kernel reads qweight, scales (and zeros) as the quantizer stored them (unpack.py says how)
# and dequantizes in registers.
#
# The kernels (the GEMV, M == 1, is gemv.py's):
#   _qmm_kernel     M > 1: dequantize a [BLOCK_N, BLOCK_K] tile to the compute dtype (the same value
#                   dequantize() gives: (code - zero) * scale rounded once) and tl.dot with fp32
#                   accumulation; SWAP_AB computes y.T = w @ x.T instead.
#   _qmm_slices_kernel  4-bit codes, few rows of x: code position i of a tile's words is a k-slice
#                   (inputs 8j + i), dequantized where it is used and multiplied by one tl.dot with
#                   the same strided slice of x, split from x's tile in registers; the weight is the
#                   first operand (y.T = w @ x.T), so a few rows of x fill only the MMA's N.
#   Split-K (both, as the GEMV): each split stores an fp32 partial; the last program of a tile to
#                   finish (a counter per tile) adds them in split order (deterministic), adds the
#                   bias and stores y, so no second kernel runs (_sum_splits).
#   _dequant_kernel the "dense" launch: the whole weight dequantized to the compute dtype (the tile
#                   _qmm_kernel makes, _weight_tile), which torch.matmul then multiplies.
#
# The row count (M) is not specialized on: a kernel compiles once per set of constexprs, which
# the launch alone decides, so launch.compile_launches can compile every launch a layer takes at load.

@triton.jit
def _dequant_kernel(
    qw_ptr, s_ptr, z_ptr, w_ptr, N, K, stride_qn, stride_sn, stride_zn, stride_wn,
    GROUP: tl.constexpr, SCALE_PER_TILE: tl.constexpr, CODE_BITS: tl.constexpr, MAGIC: tl.constexpr,
    OFFSET: tl.constexpr, HAS_ZEROS: tl.constexpr, FRACTIONAL_ZEROS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, JOIN_CODES: tl.constexpr, PACKED16: tl.constexpr,
):
    """One [BLOCK_N, BLOCK_K] tile of the dense weight (code - zero) * scale in w's dtype, rounded
    once (the "dense" launch: a dequantizing pass, then the dense matmul)."""
    CODES: tl.constexpr = 32 // CODE_BITS
    WORDS: tl.constexpr = BLOCK_K // CODES
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rn_safe = tl.where(rn < N, rn, 0).to(tl.int64)
    rw = tl.arange(0, WORDS)
    rk = k0 + tl.arange(0, BLOCK_K)
    w_ptrs = qw_ptr + rn_safe[:, None] * stride_qn + (tl.multiple_of(k0 // CODES, WORDS) + rw)[None, :]
    if EVEN_K:
        words = tl.load(w_ptrs)
    else:
        words = tl.load(w_ptrs, mask=((k0 + rw * CODES) < K)[None, :], other=0)
    w = _weight_tile(words, s_ptr, z_ptr, rn_safe, k0, K, stride_sn, stride_zn, GROUP, SCALE_PER_TILE, CODE_BITS,
                     MAGIC, OFFSET, HAS_ZEROS, FRACTIONAL_ZEROS, BLOCK_N, BLOCK_K, JOIN_CODES, PACKED16)
    mask = (rn < N)[:, None] & (rk < K)[None, :]
    tl.store(w_ptr + rn_safe[:, None] * stride_wn + rk[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_splits(acc, part_ptr, count_ptr, offs, mask, MN, SPLIT_K: tl.constexpr):
    """Split-K's fix-up for a tile of y (program_id(0)) over split program_id(1): store this split's
    fp32 partial; the last split of the tile to finish (its counter) gets the sum of all partials,
    in split order, and puts the counter back to 0. Returns (acc, whether this program stores y)."""
    tl.store(part_ptr + tl.program_id(1) * MN + offs, acc, mask=mask)
    # Every thread's store before the counter's release (one thread does the atomic).
    tl.debug_barrier()
    tile = tl.program_id(0)
    last = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1
    if last:
        acc = tl.zeros_like(acc)
        for s in tl.static_range(SPLIT_K):  # .cg: from L2, where the other programs' partials are
            acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(count_ptr + tile, 0)
    return acc, last


@triton.jit(do_not_specialize=["M"])
def _qmm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, count_ptr,
    M, N, K, stride_xm, stride_qn, stride_sn, stride_zn, stride_ym, k_per_split,
    GROUP: tl.constexpr, SCALE_PER_TILE: tl.constexpr, CODE_BITS: tl.constexpr, MAGIC: tl.constexpr,
    OFFSET: tl.constexpr, HAS_ZEROS: tl.constexpr, FRACTIONAL_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr, JOIN_CODES: tl.constexpr, SWAP_AB: tl.constexpr,
    PACKED16: tl.constexpr,
):
    """A [BLOCK_M, BLOCK_N] tile of y over one split of k: each [BLOCK_N, BLOCK_K] weight tile is
    dequantized in registers to x's dtype ((code - zero) * scale, rounded once) and fed to tl.dot
    with fp32 accumulation. SWAP_AB: computed as y.T = w @ x.T, the weight tile as the first
    operand (rows of the weight fill the MMA's M; a few rows of x only its N). JOIN_CODES: codes
    unpacked with _codes_in_order, else with _codes_3d. FRACTIONAL_ZEROS: float zero points (GGUF
    Q4_1's), taken off after 2^23 + offset, which would round them."""
    CODES: tl.constexpr = 32 // CODE_BITS
    WORDS: tl.constexpr = BLOCK_K // CODES
    rm, rn, m_mask, n_mask, rm_safe, rn_safe, k_begin, k_end = _program_tile(M, N, K, k_per_split, BLOCK_M, BLOCK_N,
                                                                             GROUP_M)
    rk = tl.arange(0, BLOCK_K)
    rw = tl.arange(0, WORDS)
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_of_word = k0 + rw * CODES
        x_ptrs = x_ptr + rm_safe[:, None] * stride_xm + (k0 + rk)[None, :]
        # k0 is a whole number of tiles: said so, a thread copies 16 bytes of words at a time, not 4
        w_ptrs = qw_ptr + rn_safe[:, None] * stride_qn + (tl.multiple_of(k0 // CODES, WORDS) + rw)[None, :]
        if EVEN_K:
            x = tl.load(x_ptrs)
            words = tl.load(w_ptrs)
        else:
            x = tl.load(x_ptrs, mask=(k0 + rk)[None, :] < K, other=0.0)
            words = tl.load(w_ptrs, mask=(k_of_word < K)[None, :], other=0)
        w = _weight_tile(words, s_ptr, z_ptr, rn_safe, k0, K, stride_sn, stride_zn, GROUP, SCALE_PER_TILE, CODE_BITS,
                         MAGIC, OFFSET, HAS_ZEROS, FRACTIONAL_ZEROS, BLOCK_N, BLOCK_K, JOIN_CODES, PACKED16)
        w = w.to(x.dtype)
        if SWAP_AB:
            acc = tl.dot(w, tl.trans(x), acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=INPUT_PRECISION)
    if SWAP_AB:  # acc is y.T: [BLOCK_N, BLOCK_M]
        out_offs = rm_safe[None, :] * N + rn[:, None]
        y_offs = rm_safe[None, :] * stride_ym + rn[:, None]
        out_mask = n_mask[:, None] & m_mask[None, :]
    else:
        out_offs = rm_safe[:, None] * N + rn[None, :]
        y_offs = rm_safe[:, None] * stride_ym + rn[None, :]
        out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        acc, stores = _sum_splits(acc, part_ptr, count_ptr, out_offs, out_mask, M * N, SPLIT_K)
    else:
        stores = True
    if stores:
        if HAS_BIAS:
            bias = tl.load(b_ptr + rn_safe).to(tl.float32)
            if SWAP_AB:
                acc += bias[:, None]
            else:
                acc += bias[None, :]
        tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _slice_of(words, i: tl.constexpr, scale, zero):
    """Code position i of every word (inputs 8j + i), (u - zero) * scale rounded once to scale's
    dtype, as dequantize() gives it; zero includes the stored offset."""
    u = ((words >> (4 * i)) & 0xF).to(tl.float32)
    return ((u - zero) * scale.to(tl.float32)).to(scale.dtype)


@triton.jit
def _x_slices(x3, R: tl.constexpr, W: tl.constexpr):
    """x3 [R, W, 8] (inputs 8j + i at [:, j, i]) -> the eight [R, W] slices x3[:, :, i], by
    halving the last dimension (each thread holds its 8 inputs side by side: no data moves)."""
    c = tl.reshape(x3, [R, W, 2, 2, 2])  # i = 4a + 2b + c
    c0, c1 = tl.split(c)
    c00, c01 = tl.split(c0)
    c10, c11 = tl.split(c1)
    x0, x4 = tl.split(c00)
    x2, x6 = tl.split(c01)
    x1, x5 = tl.split(c10)
    x3_, x7 = tl.split(c11)
    return x0, x1, x2, x3_, x4, x5, x6, x7


@triton.jit(do_not_specialize=["M"])
def _qmm_slices_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, count_ptr,
    M, N, K, stride_xm, stride_qn, stride_sn, stride_zn, stride_ym, k_per_split,
    GROUP: tl.constexpr, SCALE_PER_TILE: tl.constexpr, CODE_OFFSET: tl.constexpr, HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PACKED16: tl.constexpr,
):
    """A [BLOCK_N, BLOCK_M] tile of y.T over one split of k, 4-bit codes: per k tile the eight
    code positions of its words are eight k-slices of W = BLOCK_K / 8 inputs (8j + i), each
    dequantized to the scales' dtype and multiplied by tl.dot with x's matching slice (fp32
    accumulation). Each slice is taken from the words with a shift and a mask where it is used,
    and x's from its tile in registers: no tile is reordered through shared memory for it.
    PACKED16 (one scale per row and tile): slices s and s + 4 come out of one register of
    unpack.py's _packed_pairs."""
    W: tl.constexpr = BLOCK_K // 8
    rm, rn, m_mask, n_mask, rm_safe, rn_safe, k_begin, k_end = _program_tile(M, N, K, k_per_split, BLOCK_M, BLOCK_N,
                                                                             GROUP_M)
    rw = tl.arange(0, W)
    ri = tl.arange(0, 8)
    dtype = s_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_of_word = k0 + rw * 8
        # k0 is a whole number of tiles: said so, a thread copies 16 bytes of words at a time, not 4
        w_ptrs = qw_ptr + rn_safe[:, None] * stride_qn + (tl.multiple_of(k0 // 8, W) + rw)[None, :]
        x_ptrs = x_ptr + rm_safe[:, None, None] * stride_xm + k_of_word[None, :, None] + ri[None, None, :]
        if EVEN_K:
            words = tl.load(w_ptrs)
            x3 = tl.load(x_ptrs, mask=m_mask[:, None, None], other=0.0)
        else:
            words = tl.load(w_ptrs, mask=(k_of_word < K)[None, :], other=0)
            x3 = tl.load(x_ptrs, mask=m_mask[:, None, None] & (k_of_word < K)[None, :, None], other=0.0)
        if SCALE_PER_TILE:
            g = k0 // GROUP
            row_scale = tl.load(s_ptr + rn_safe * stride_sn + g)
            scale = tl.broadcast_to(row_scale[:, None], [BLOCK_N, W])
            if HAS_ZEROS:  # the code standing for 0.0, as stored
                row_zero = tl.load(z_ptr + rn_safe * stride_zn + g).to(tl.float32) + CODE_OFFSET
                zero = tl.broadcast_to(row_zero[:, None], [BLOCK_N, W])
            else:
                row_zero = None
                zero = CODE_OFFSET
        else:
            g = tl.minimum(k_of_word, K - 1) // GROUP
            scale = tl.load(s_ptr + rn_safe[:, None] * stride_sn + g[None, :])
            if HAS_ZEROS:
                zero = tl.load(z_ptr + rn_safe[:, None] * stride_zn + g[None, :]).to(tl.float32) + CODE_OFFSET
            else:
                zero = CODE_OFFSET
        x0, x1, x2, x3_, x4, x5, x6, x7 = _x_slices(x3.to(dtype), BLOCK_M, W)
        if PACKED16:
            p0, p1, p2, p3 = _packed_pairs(words, row_scale, row_zero, int(CODE_OFFSET), BLOCK_N, W, dtype == tl.bfloat16)
            acc = tl.dot(_half16(p0, False, dtype == tl.bfloat16), tl.trans(x0), acc)
            acc = tl.dot(_half16(p1, False, dtype == tl.bfloat16), tl.trans(x1), acc)
            acc = tl.dot(_half16(p2, False, dtype == tl.bfloat16), tl.trans(x2), acc)
            acc = tl.dot(_half16(p3, False, dtype == tl.bfloat16), tl.trans(x3_), acc)
            acc = tl.dot(_half16(p0, True, dtype == tl.bfloat16), tl.trans(x4), acc)
            acc = tl.dot(_half16(p1, True, dtype == tl.bfloat16), tl.trans(x5), acc)
            acc = tl.dot(_half16(p2, True, dtype == tl.bfloat16), tl.trans(x6), acc)
            acc = tl.dot(_half16(p3, True, dtype == tl.bfloat16), tl.trans(x7), acc)
        else:
            acc = tl.dot(_slice_of(words, 0, scale, zero), tl.trans(x0), acc)
            acc = tl.dot(_slice_of(words, 1, scale, zero), tl.trans(x1), acc)
            acc = tl.dot(_slice_of(words, 2, scale, zero), tl.trans(x2), acc)
            acc = tl.dot(_slice_of(words, 3, scale, zero), tl.trans(x3_), acc)
            acc = tl.dot(_slice_of(words, 4, scale, zero), tl.trans(x4), acc)
            acc = tl.dot(_slice_of(words, 5, scale, zero), tl.trans(x5), acc)
            acc = tl.dot(_slice_of(words, 6, scale, zero), tl.trans(x6), acc)
            acc = tl.dot(_slice_of(words, 7, scale, zero), tl.trans(x7), acc)
    out_mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT_K > 1:
        acc, stores = _sum_splits(acc, part_ptr, count_ptr, rm_safe[None, :] * N + rn[:, None], out_mask, M * N, SPLIT_K)
    else:
        stores = True
    if stores:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn_safe).to(tl.float32)[:, None]
        tl.store(y_ptr + rm_safe[None, :] * stride_ym + rn[:, None], acc.to(y_ptr.dtype.element_ty), mask=out_mask)
