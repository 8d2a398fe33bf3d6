"""Unpacking the stored codes into weights inside the quantized kernels (gemv.py, kernels.py): a
tile of words to its fp32 (or, packed, 16-bit) weight tile (code - zero) * scale.

Static code, copied (from the marker below on) into every generated triton module before the
kernels."""

import triton
import triton.language as tl

# ---- copied into generated modules from here ----

# Every kernel reads qweight, scales (and zeros) as the quantizer stored them and dequantizes in
# registers. The stored layout is already the one the kernels want: qweight is [out, in / codes per
# word], row-major, codes little-endian along the input dimension, so an output row's codes are one
# contiguous run of words and a tile [BLOCK_N rows, BLOCK_K codes] is BLOCK_N runs of BLOCK_K /
# codes-per-word words (coalesced loads along each row). There is no repack at load time: the kernels
# read 32-bit words, and the other storages are the same bytes under another dtype (little-endian),
# viewed without a copy:
#   int4 in int32 words     code k of word j (bits 4k..4k+3) is input 8j + k
#   int4 in uint8 bytes     4 bytes make a word whose bits 4k..4k+3 hold input 8j + k: the same
#   int8 codes (int8/uint8) 4 bytes make a word whose bits 8k..8k+7 hold input 4j + k
# A code u (as stored: 4-bit codes offset to unsigned, int8 codes in two's complement) becomes a
# float with one integer op and no int->float conversion: the fp32 whose bits are 0x4B000000 | u is
# 2^23 + u exactly (the xor of 0x80 turns a two's-complement byte into code + 128), and subtracting
# 2^23 + offset (+ zero point) leaves code - zero exactly.

@triton.jit
def _code_at(words, i: tl.constexpr, CODE_BITS: tl.constexpr, MAGIC: tl.constexpr):
    """Code i of every word as the fp32 2^23 + u (u as stored, + 128 for two's-complement bytes):
    subtract 2^23 + offset (+ zero point) to get code - zero exactly."""
    u = (words >> (i * CODE_BITS)) & ((1 << CODE_BITS) - 1)
    return (u ^ MAGIC).to(tl.float32, bitcast=True)


@triton.jit
def _code_in_place(src, MASK: tl.constexpr, ONE_LOP3: tl.constexpr):
    """The fp32 whose bits are 0x4B000000 | (src & MASK): 2^23 + the masked bits, exactly. ONE_LOP3
    (a GPU): one `lop3` with the mask in a register; left to the compiler, the two immediates take
    an AND and an OR (one LOP3 each, the GEMV's loop twice as many integer ops as codes)."""
    if ONE_LOP3:
        mask = tl.full(src.shape, MASK, tl.int32)
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, 0x4B000000, 0xEA;", "=r,r,r", [src, mask],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return ((src & MASK) | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _codes_in_order(words, R: tl.constexpr, W: tl.constexpr, CODE_BITS: tl.constexpr, MAGIC: tl.constexpr):
    """[R, W] words -> [R, W * codes per word] codes as _code_at gives them, in input order. Built
    by joining the per-position tensors (join keeps the new axis in each thread, so a thread holds
    its words' codes side by side): joining p_i with p_(i + C/2) first, then + C/4, ..., makes the
    flattened index word * C + i."""
    if CODE_BITS == 4:
        c = tl.join(
            tl.join(tl.join(_code_at(words, 0, 4, MAGIC), _code_at(words, 4, 4, MAGIC)),
                    tl.join(_code_at(words, 2, 4, MAGIC), _code_at(words, 6, 4, MAGIC))),
            tl.join(tl.join(_code_at(words, 1, 4, MAGIC), _code_at(words, 5, 4, MAGIC)),
                    tl.join(_code_at(words, 3, 4, MAGIC), _code_at(words, 7, 4, MAGIC))),
        )
        return tl.reshape(c, [R, W * 8])
    else:
        c = tl.join(tl.join(_code_at(words, 0, 8, MAGIC), _code_at(words, 2, 8, MAGIC)),
                    tl.join(_code_at(words, 1, 8, MAGIC), _code_at(words, 3, 8, MAGIC)))
        return tl.reshape(c, [R, W * 4])


@triton.jit
def _codes_3d(words, CODE_BITS: tl.constexpr, MAGIC: tl.constexpr):
    """[R, W] words -> [R, W, codes per word], codes as _code_at gives them (one broadcast shift)."""
    shifts = tl.arange(0, 32 // CODE_BITS) * CODE_BITS
    u = (words[:, :, None] >> shifts[None, None, :]) & ((1 << CODE_BITS) - 1)
    return (u ^ MAGIC).to(tl.float32, bitcast=True)


# 4-bit codes straight to 16-bit weights, two per 32-bit register (sm_90's packed bf16 arithmetic,
# or f16x2 anywhere): nibbles s and s + 4 of a word go into the low mantissa bits of a pair of
# 128.0 (bf16; 1024.0 for fp16, whose step there is also 1), subtracting the pair 128 + zero leaves
# code - zero exactly, and one packed multiply by the scale rounds it once, as dequantize() does.
# About 2 instructions a weight where the fp32 unpacking takes ~6 (the sm_90 SASS of the mm loop).
_NIBBLE_PAIRS_ASM = """{
.reg .b32 t1, t2, t3, c0, c1, c2, c3;
shr.u32 t1, $4, 4;
shr.u32 t2, $4, 8;
shr.u32 t3, $4, 12;
lop3.b32 c0, $4, 0x000F000F, MAGIC, 0xEA;
lop3.b32 c1, t1, 0x000F000F, MAGIC, 0xEA;
lop3.b32 c2, t2, 0x000F000F, MAGIC, 0xEA;
lop3.b32 c3, t3, 0x000F000F, MAGIC, 0xEA;
sub.TYPE c0, c0, $6;
sub.TYPE c1, c1, $6;
sub.TYPE c2, c2, $6;
sub.TYPE c3, c3, $6;
mul.rn.TYPE $0, c0, $5;
mul.rn.TYPE $1, c1, $5;
mul.rn.TYPE $2, c2, $5;
mul.rn.TYPE $3, c3, $5;
}"""
NIBBLES_TO_BF16X2 = tl.constexpr(_NIBBLE_PAIRS_ASM.replace("MAGIC", "0x43004300").replace("TYPE", "bf16x2"))
NIBBLES_TO_F16X2 = tl.constexpr(_NIBBLE_PAIRS_ASM.replace("MAGIC", "0x64006400").replace("TYPE", "f16x2"))


@triton.jit
def _pair16(value, IS_BF16: tl.constexpr):
    """[...] 16-bit floats -> int32 holding the value in both halves (an x2 operand)."""
    if IS_BF16:
        bits = value.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    else:
        bits = value.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return bits | (bits << 16)


@triton.jit
def _half16(pairs, HIGH: tl.constexpr, IS_BF16: tl.constexpr):
    """The low or high 16-bit float of each int32 of pairs."""
    bits = (pairs >> 16) if HIGH else pairs
    if IS_BF16:
        return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return bits.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _packed_pairs(words, scale, zero, ZERO_CODE: tl.constexpr, R: tl.constexpr, W: tl.constexpr,
                  IS_BF16: tl.constexpr):
    """[R, W] words of 4-bit codes, one scale per row ([R]) and the code standing for 0.0 (zero
    [R], whole, or None: ZERO_CODE for every row) -> four int32 [R, W]: the 16-bit weights
    (code - zero) * scale of code positions (s, s + 4) in the low and high halves of the s-th, by
    packed 16-bit arithmetic."""
    scale2 = _pair16(scale, IS_BF16)[:, None] + tl.zeros([R, W], dtype=tl.int32)
    one: tl.constexpr = 128.0 if IS_BF16 else 1024.0  # the step of 16-bit floats there is 1
    if zero is None:  # a constant pair: no per-row tensor to lay out
        bits: tl.constexpr = (0x4300 if IS_BF16 else 0x6400) + ZERO_CODE
        base2 = tl.full([R, W], bits * 0x10001, tl.int32)
    else:
        base2 = _pair16(zero + one, IS_BF16)[:, None] + tl.zeros([R, W], dtype=tl.int32)
    if IS_BF16:
        return tl.inline_asm_elementwise(NIBBLES_TO_BF16X2, "=r,=r,=r,=r,r,r,r", [words, scale2, base2],
                                         dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(NIBBLES_TO_F16X2, "=r,=r,=r,=r,r,r,r", [words, scale2, base2],
                                         dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _packed_weight_tile(words, scale, zero, ZERO_CODE: tl.constexpr, R: tl.constexpr, W: tl.constexpr,
                        IS_BF16: tl.constexpr):
    """_packed_pairs' weights as the [R, W * 8] 16-bit tile in input order."""
    p0, p1, p2, p3 = _packed_pairs(words, scale, zero, ZERO_CODE, R, W, IS_BF16)
    c = tl.join(
        tl.join(tl.join(_half16(p0, False, IS_BF16), _half16(p0, True, IS_BF16)),
                tl.join(_half16(p2, False, IS_BF16), _half16(p2, True, IS_BF16))),
        tl.join(tl.join(_half16(p1, False, IS_BF16), _half16(p1, True, IS_BF16)),
                tl.join(_half16(p3, False, IS_BF16), _half16(p3, True, IS_BF16))),
    )
    return tl.reshape(c, [R, W * 8])


# The GEMV's packed path (gemv.py, _qgemv_kernel's PACKED16): a word's 8 products x * (code -
# zero) in f16x2 arithmetic, about 2 instructions a code where fp32 takes ~5. Masks 0x000F000F and
# 0x00F000F0 of the word (and of it shifted down a byte) put codes (s, s + 4) into the mantissas of a
# pair of 1024.0: 1024 + u for s = 0, 2 and 1024 + 16u for s = 1, 3 (exact: the step there is 1);
# taking off the pair 1024 + zero (1024 + 16 zero) leaves (16) (code - zero) exactly, and the x
# pairs of s = 1, 3 are x / 16. Four packed FMAs sum the word's products in two halves (|x| < 2, so
# under 4 * 15 * 2); the halves go to fp32 once per word.
NIBBLE_DOTS_F16X2 = tl.constexpr("""{
.reg .b32 t, c, acc;
.reg .b16 lo, hi;
.reg .f32 flo, fhi;
lop3.b32 c, $1, 0x000F000F, 0x64006400, 0xEA;
sub.f16x2 c, c, $2;
mul.rn.f16x2 acc, c, $4;
lop3.b32 c, $1, 0x00F000F0, 0x64006400, 0xEA;
sub.f16x2 c, c, $3;
fma.rn.f16x2 acc, c, $5, acc;
shr.u32 t, $1, 8;
lop3.b32 c, t, 0x000F000F, 0x64006400, 0xEA;
sub.f16x2 c, c, $2;
fma.rn.f16x2 acc, c, $6, acc;
lop3.b32 c, t, 0x00F000F0, 0x64006400, 0xEA;
sub.f16x2 c, c, $3;
fma.rn.f16x2 acc, c, $7, acc;
mov.b32 {lo, hi}, acc;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 $0, flo, fhi;
}""")


@triton.jit
def _f16x2(low, high):
    """Two fp32 tensors -> int32 holding them as fp16, low in the low half (round to nearest)."""
    return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [low, high], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _nibble_dots(words, zero_code, x0, x1, x2, x3, x4, x5, x6, x7, R: tl.constexpr, W: tl.constexpr):
    """[R, W] words of 4-bit codes, the code standing for 0.0 (whole: [R, 1] or [R, W] int32) and
    x's eight [W] inputs of each word -> [R, W] fp32: sum_i x_i (code_i - zero) / p and p [W], p
    the power of two of each word's largest |x_i| (x / p is under 2: fp16's range). A GPU only
    (inline PTX)."""
    big = tl.maximum(tl.maximum(tl.maximum(tl.abs(x0), tl.abs(x1)), tl.maximum(tl.abs(x2), tl.abs(x3))),
                     tl.maximum(tl.maximum(tl.abs(x4), tl.abs(x5)), tl.maximum(tl.abs(x6), tl.abs(x7))))
    p_bits = big.to(tl.int32, bitcast=True) & 0x7F800000  # 0 for 0 and subnormal words: they count 0
    inv = (0x7F000000 - p_bits).to(tl.float32, bitcast=True)  # 1 / p, exactly
    inv16 = (0x7D000000 - p_bits).to(tl.float32, bitcast=True)  # 1 / (16 p)
    zero0 = 0x64006400 + zero_code * 0x10001  # the pairs 1024 + zero, 1024 + 16 zero
    zero1 = 0x64006400 + zero_code * 0x100010
    dots = tl.inline_asm_elementwise(
        NIBBLE_DOTS_F16X2, "=r,r,r,r,r,r,r,r",
        [words, tl.broadcast_to(zero0, (R, W)), tl.broadcast_to(zero1, (R, W)),
         tl.broadcast_to(_f16x2(x0 * inv, x4 * inv)[None, :], (R, W)),
         tl.broadcast_to(_f16x2(x1 * inv16, x5 * inv16)[None, :], (R, W)),
         tl.broadcast_to(_f16x2(x2 * inv, x6 * inv)[None, :], (R, W)),
         tl.broadcast_to(_f16x2(x3 * inv16, x7 * inv16)[None, :], (R, W))],
        dtype=tl.float32, is_pure=True, pack=1)
    return dots, p_bits.to(tl.float32, bitcast=True)


@triton.jit
def _less_zero(f, zero, OFFSET: tl.constexpr, FRACTIONAL_ZEROS: tl.constexpr):
    """code - zero of codes f as _code_at gives them (2^23 + u): exact for whole zero points;
    a fractional one is taken off after 2^23 + offset, as 2^23 + zero would round it."""
    if FRACTIONAL_ZEROS:
        return (f - OFFSET) - zero
    else:
        return f - (zero + OFFSET)


@triton.jit
def _weight_tile(words, s_ptr, z_ptr, rn_safe, k0, K, stride_sn, stride_zn,
                 GROUP: tl.constexpr, SCALE_PER_TILE: tl.constexpr, CODE_BITS: tl.constexpr, MAGIC: tl.constexpr,
                 OFFSET: tl.constexpr, HAS_ZEROS: tl.constexpr, FRACTIONAL_ZEROS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, JOIN_CODES: tl.constexpr, PACKED16: tl.constexpr):
    """The fp32 [BLOCK_N, BLOCK_K] weight tile (code - zero) * scale of rows rn_safe from k0, given
    its loaded words [BLOCK_N, BLOCK_K / codes per word]. JOIN_CODES: codes unpacked with
    _codes_in_order, else with _codes_3d. PACKED16 (4-bit codes, one scale per row and tile,
    whole zero points, a 16-bit scales' dtype, a GPU): the tile in the scales' dtype from
    _packed_weight_tile, the same values."""
    CODES: tl.constexpr = 32 // CODE_BITS
    WORDS: tl.constexpr = BLOCK_K // CODES
    k_of_word = k0 + tl.arange(0, WORDS) * CODES
    if SCALE_PER_TILE:
        g = k0 // GROUP
        scale = tl.load(s_ptr + rn_safe * stride_sn + g).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + rn_safe * stride_zn + g).to(tl.float32)
        else:
            zero = tl.zeros([BLOCK_N], dtype=tl.float32)
        if PACKED16:  # the code standing for 0.0: the stored offset (symmetric codes: 8) + the zero point
            OFFSET_CODE: tl.constexpr = int(OFFSET - 8388608.0)
            w = _packed_weight_tile(words, scale, zero + OFFSET_CODE if HAS_ZEROS else None, OFFSET_CODE, BLOCK_N, WORDS,
                                    s_ptr.dtype.element_ty == tl.bfloat16)
        elif JOIN_CODES:
            f = _codes_in_order(words, BLOCK_N, WORDS, CODE_BITS, MAGIC)
            w = _less_zero(f, zero[:, None], OFFSET, FRACTIONAL_ZEROS) * scale[:, None]
        else:
            f = _codes_3d(words, CODE_BITS, MAGIC)
            w = tl.reshape(_less_zero(f, zero[:, None, None], OFFSET, FRACTIONAL_ZEROS) * scale[:, None, None],
                           [BLOCK_N, BLOCK_K])
    else:
        g = tl.minimum(k_of_word, K - 1) // GROUP
        scale = tl.load(s_ptr + rn_safe[:, None] * stride_sn + g[None, :]).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + rn_safe[:, None] * stride_zn + g[None, :]).to(tl.float32)
        else:
            zero = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
        if JOIN_CODES:
            f = tl.reshape(_codes_in_order(words, BLOCK_N, WORDS, CODE_BITS, MAGIC), [BLOCK_N, WORDS, CODES])
        else:
            f = _codes_3d(words, CODE_BITS, MAGIC)
        w = tl.reshape(_less_zero(f, zero[:, :, None], OFFSET, FRACTIONAL_ZEROS) * scale[:, :, None],
                       [BLOCK_N, BLOCK_K])
    return w
