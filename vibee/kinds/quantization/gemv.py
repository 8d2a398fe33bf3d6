"""The quantized GEMV's Triton kernel: y = x @ dequantize(qw).T + bias for one row of x, without a
dense weight.

Static code: no spec changes it. The quantization templates copy it (from the marker below on)
into every generated triton module, after unpack.py, silu_mul.py and rope_epilogue.py and before kernels.py; launch.py picks its
tile (constexprs) from the spec's tile table.
"""

import triton
import triton.language as tl

from vibee.kinds.quantization.rope_epilogue import RopeTarget, _rope_pairs_store, rope_fits
from vibee.kinds.quantization.silu_mul import _silu_times_up
from vibee.kinds.quantization.unpack import _code_in_place, _nibble_dots

# ---- copied into generated modules from here ----


def rope_takes(rope: RopeTarget, out_features: int, block_n: int) -> bool:
    """Whether _rope_store can store this projection from tiles of block_n rows: rope_fits, and whole
    heads of a power-of-two head_dim a tile."""
    d = rope.head_dim
    return rope_fits(rope, out_features) and d & (d - 1) == 0 and block_n % d == 0


@triton.jit
def _rope_store(y, pid_n, y_ptr, N, pos_ptr, inv_freq_ptr, scaling, slot_ptr, k_pages_ptr, v_pages_ptr, block_size,
                stride_pb, stride_ps, stride_ph, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """y [BLOCK_N] (fp32): rows pid_n * BLOCK_N... of one token's [q heads | k heads | v heads],
    whole heads, stored by _rope_pairs_store."""
    HALF: tl.constexpr = HEAD_DIM // 2
    HEADS: tl.constexpr = BLOCK_N // HEAD_DIM
    x1, x2 = tl.split(tl.permute(tl.reshape(y, [HEADS, 2, HALF]), (0, 2, 1)))
    head = pid_n * HEADS + tl.arange(0, HEADS)[:, None]
    d = tl.arange(0, HALF)[None, :]
    _rope_pairs_store(x1, x2, head, d, head * HEAD_DIM < N, y_ptr, pos_ptr, inv_freq_ptr, scaling, slot_ptr,
                      k_pages_ptr, v_pages_ptr, block_size, stride_pb, stride_ps, stride_ph, HEAD_DIM, Q_HEADS,
                      KV_HEADS, USE_LIBDEVICE)


# _qgemv_kernel, M == 1: FMAs over [BLOCK_N rows, words] 2-D tiles (fp32, one code position of the
# words at a time, each code masked in place rather than shifted down; or f16x2 for 4-bit codes on
# a GPU); each lane keeps its words' partial sums, scales each word's sum once (one scale per row
# when the tile lies in one group), and the lanes are summed after the loop. Split-K over the input
# dimension so that every SM has several programs in flight; the last split of a row tile adds the
# partials (as kernels.py's tile kernels do).

@triton.jit
def _x_input(x_ptr, k_of_word, i: tl.constexpr, K, EVEN_K: tl.constexpr):
    """Input i of each word's run of x, in fp32 (0 past K)."""
    if EVEN_K:
        v = tl.load(x_ptr + k_of_word + i)
    else:
        v = tl.load(x_ptr + k_of_word + i, mask=k_of_word < K, other=0.0)
    return v.to(tl.float32)


@triton.jit
def _gemv_scale_zero(s_ptr, z_ptr, rn, k0, k_of_word, K, stride_sn, stride_zn, GROUP: tl.constexpr,
                     SCALE_PER_TILE: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The scales (fp32) and zero points (as stored; 0 without) of the GEMV's tile: [BLOCK_N, 1]
    when the whole tile is in one group, else one per word ([BLOCK_N, WORDS]: a group holds whole
    words)."""
    if SCALE_PER_TILE:
        g = k0 // GROUP
        scale = tl.load(s_ptr + rn * stride_sn + g).to(tl.float32)[:, None]
        if HAS_ZEROS:
            zero = tl.load(z_ptr + rn * stride_zn + g)[:, None]
        else:
            zero = tl.zeros([BLOCK_N, 1], dtype=tl.uint8)
    else:
        g = tl.minimum(k_of_word, K - 1) // GROUP
        scale = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :]).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + rn[:, None] * stride_zn + g[None, :])
        else:
            zero = tl.zeros([BLOCK_N, 1], dtype=tl.uint8)
    return scale, zero


@triton.jit
def _fp32_word_dots(words, x_ptr, k_of_word, s_ptr, z_ptr, rn, k0, K, stride_sn, stride_zn, GROUP: tl.constexpr,
                    SCALE_PER_TILE: tl.constexpr, CODE_BITS: tl.constexpr, FLIP: tl.constexpr, CODE_OFFSET: tl.constexpr,
                    HAS_ZEROS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr,
                    ONE_LOP3: tl.constexpr):
    """[BLOCK_N, WORDS] sums over each word's codes of x * (code - zero) * scale, in fp32 (the
    GEMV's docstring says how)."""
    CODES: tl.constexpr = 32 // CODE_BITS
    HALF: tl.constexpr = CODES // 2
    MASK: tl.constexpr = (1 << CODE_BITS) - 1
    if FLIP:  # FLIP is 0x80: every byte's top bit, 0x80808080 as an int32
        words = words ^ -0x7F7F7F80
    high = words >> 16
    part = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    x_sum = tl.zeros([WORDS], dtype=tl.float32)
    for i in tl.static_range(CODES):
        xi = _x_input(x_ptr, k_of_word, i, K, EVEN_K)
        x_sum += xi
        if i < HALF:
            src = words
        else:
            src = high
        shift = CODE_BITS * (i % HALF)
        f = _code_in_place(src, MASK << shift, ONE_LOP3) - 8388608.0
        part += f * (xi * (1.0 / (1 << shift)))[None, :]
    scale, zero = _gemv_scale_zero(s_ptr, z_ptr, rn, k0, k_of_word, K, stride_sn, stride_zn, GROUP, SCALE_PER_TILE,
                                   HAS_ZEROS, BLOCK_N)
    if HAS_ZEROS:
        zero = zero.to(tl.float32) + CODE_OFFSET
    else:
        zero = CODE_OFFSET
    return (part - zero * x_sum[None, :]) * scale


@triton.jit
def _packed_word_dots(words, x_ptr, k_of_word, s_ptr, z_ptr, rn, k0, K, stride_sn, stride_zn, GROUP: tl.constexpr,
                      SCALE_PER_TILE: tl.constexpr, CODE_OFFSET: tl.constexpr, HAS_ZEROS: tl.constexpr,
                      EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr):
    """_fp32_word_dots' sums for 4-bit codes and whole zero points by f16x2 arithmetic (unpack.py,
    _nibble_dots): x scaled by a power of two a word into fp16's range, the products exact to
    fp16's rounding, each word's sum in fp32."""
    scale, zero = _gemv_scale_zero(s_ptr, z_ptr, rn, k0, k_of_word, K, stride_sn, stride_zn, GROUP, SCALE_PER_TILE,
                                   HAS_ZEROS, BLOCK_N)
    OFFSET_CODE: tl.constexpr = int(CODE_OFFSET)
    if HAS_ZEROS:
        zero_code = zero.to(tl.int32) + OFFSET_CODE
    else:
        zero_code = tl.full([BLOCK_N, 1], OFFSET_CODE, tl.int32)
    dots, p = _nibble_dots(words, zero_code, _x_input(x_ptr, k_of_word, 0, K, EVEN_K), _x_input(x_ptr, k_of_word, 1, K, EVEN_K),
                           _x_input(x_ptr, k_of_word, 2, K, EVEN_K), _x_input(x_ptr, k_of_word, 3, K, EVEN_K),
                           _x_input(x_ptr, k_of_word, 4, K, EVEN_K), _x_input(x_ptr, k_of_word, 5, K, EVEN_K),
                           _x_input(x_ptr, k_of_word, 6, K, EVEN_K), _x_input(x_ptr, k_of_word, 7, K, EVEN_K),
                           BLOCK_N, WORDS)
    return dots * (scale * p[None, :])


@triton.jit
def _qgemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, count_ptr, act_ptr,
    N, K, stride_qn, stride_sn, stride_zn, k_per_split,
    pos_ptr, inv_freq_ptr, scaling, slot_ptr, k_pages_ptr, v_pages_ptr, block_size, stride_pb, stride_ps, stride_ph,
    GROUP: tl.constexpr, SCALE_PER_TILE: tl.constexpr, CODE_BITS: tl.constexpr, FLIP: tl.constexpr,
    CODE_OFFSET: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_LOP3: tl.constexpr,
    PACKED16: tl.constexpr, STAGES: tl.constexpr, SILU_MUL: tl.constexpr,
    ROPE: tl.constexpr, HEAD_DIM: tl.constexpr, Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr,
):
    """y[n] = sum_k x[k] (u[n, k] - zero) scale[n, k // GROUP] + bias[n] for BLOCK_N rows; u is
    the code as stored (offset to unsigned), zero the offset or zero point.

    SPLIT_K > 1: program pid_k sums one split of k into an fp32 partial, and the last program of
    a row tile to finish (a counter per tile) adds the partials up in split order (deterministic)
    and stores y, so there is no second kernel to launch; it puts the counter back to 0 for the
    next call. Launches sharing count_ptr must run one after another (one stream).

    Few integer ops per code, as the kernel is otherwise bound by them, not by memory: a code is
    masked in place (u * 2^s, s its bit offset within a half word, so below 2^16) and or-ed into
    the fp32 2^23 (one LOP3 on a GPU: _code_in_place), which less 2^23 is u * 2^s exactly; x is
    pre-scaled by 2^-s (exact) once per tile for all rows. The upper half word is shifted down once
    per word. The zero is taken out once per word: sum_i x_i (u_i - zero) = sum_i x_i u_i - zero *
    sum_i x_i. FLIP (0x80 for two's-complement int8 codes) turns every byte of a word into code +
    128 with one XOR per word. PACKED16 (4-bit codes, whole zero points, a GPU): the products by
    f16x2 arithmetic instead (_packed_word_dots; sm_90 SASS of the loop: 0.77-0.82x the
    instructions). STAGES > 1: Triton's pipeliner loads the words of later tiles ahead (cp.async).
    SILU_MUL: x is [gate | up] (2K) and the product is with silu(gate) * up, rounded as the
    runtime's silu_mul rounds it: each program first writes its split's inputs into act_ptr (K of
    x's dtype) in a 1-D layout, then reads them there as x. Computed where the loop loads x, every
    lane of a word's column worked it out again: 13.8 us a call at 2048x8192 on an H100, against
    11.2 for silu_mul then the GEMV. Programs of one split write the same values (benign).
    ROPE: the weight is a QKV projection's (Q_HEADS, KV_HEADS heads of HEAD_DIM rows, BLOCK_N
    whole heads); y is stored by _rope_store above (q and k rotated for the token's
    position, k and v also into the KV pages at its slot): the pointers after k_per_split are its."""
    CODES: tl.constexpr = 32 // CODE_BITS
    WORDS: tl.constexpr = BLOCK_K // CODES
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rn = tl.where(n_mask, rn, 0).to(tl.int64)  # rows past N read row 0 and are not stored
    rw = tl.arange(0, WORDS)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    if SILU_MUL:
        for k0 in range(k_begin, k_end, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            gate = tl.load(x_ptr + rk, mask=rk < k_end, other=0.0)
            up = tl.load(x_ptr + K + rk, mask=rk < k_end, other=0.0)
            tl.store(act_ptr + rk, _silu_times_up(gate, up), mask=rk < k_end)
        tl.debug_barrier()  # every lane's inputs stored before any lane reads them
        x_ptr = act_ptr
    acc = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=STAGES):
        k_of_word = k0 + rw * CODES  # first input of each word
        # 4 bytes a thread: 16 (tl.multiple_of on the offset, as kernels.py's tiles) took 1-8% longer (H100)
        w_ptrs = qw_ptr + rn[:, None] * stride_qn + (k0 // CODES + rw)[None, :]
        if EVEN_K:
            words = tl.load(w_ptrs)
        else:
            words = tl.load(w_ptrs, mask=(k_of_word < K)[None, :], other=0)
        if PACKED16:
            acc += _packed_word_dots(words, x_ptr, k_of_word, s_ptr, z_ptr, rn, k0, K, stride_sn, stride_zn, GROUP,
                                     SCALE_PER_TILE, CODE_OFFSET, HAS_ZEROS, EVEN_K, BLOCK_N, WORDS)
        else:
            acc += _fp32_word_dots(words, x_ptr, k_of_word, s_ptr, z_ptr, rn, k0, K, stride_sn, stride_zn, GROUP,
                                   SCALE_PER_TILE, CODE_BITS, FLIP, CODE_OFFSET, HAS_ZEROS, EVEN_K, BLOCK_N, WORDS,
                                   ONE_LOP3)
    y = tl.sum(acc, axis=1)
    if SPLIT_K == 1:
        if HAS_BIAS:
            y += tl.load(b_ptr + rn).to(tl.float32)
        if ROPE:
            _rope_store(y, pid_n, y_ptr, N, pos_ptr, inv_freq_ptr, scaling, slot_ptr, k_pages_ptr, v_pages_ptr,
                        block_size, stride_pb, stride_ps, stride_ph, BLOCK_N, HEAD_DIM, Q_HEADS, KV_HEADS, USE_LIBDEVICE)
        else:
            tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.store(part_ptr + pid_k * N + rn, y, mask=n_mask)
        # Every thread's store before the counter's release (one thread does the atomic).
        tl.debug_barrier()
        finished = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if finished == SPLIT_K - 1:
            y = tl.zeros([BLOCK_N], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):  # .cg: from L2, where the other programs' partials are
                y += tl.load(part_ptr + s * N + rn, mask=n_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                y += tl.load(b_ptr + rn).to(tl.float32)
            if ROPE:
                _rope_store(y, pid_n, y_ptr, N, pos_ptr, inv_freq_ptr, scaling, slot_ptr, k_pages_ptr, v_pages_ptr,
                            block_size, stride_pb, stride_ps, stride_ph, BLOCK_N, HEAD_DIM, Q_HEADS, KV_HEADS,
                            USE_LIBDEVICE)
            else:
                tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_mask)
            tl.store(count_ptr + pid_n, 0)
