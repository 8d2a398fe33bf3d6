"""Rounding to float8 e4m3 in fp32 arithmetic, shared by the fp8 matmul (fp8_kernels.py) and the
fp8 KV cache's page write (the kv_cache triton template): both templates copy it from the marker
on, so each generated module stands alone.
"""

import triton
import triton.language as tl

# ---- copied into generated modules from here ----

@triton.jit
def _e4m3(x):
    """fp32 x (|x| <= 448) rounded to float8 e4m3's grid, ties to even, subnormals (steps of 2^-9
    below 2^-6) kept, still in fp32, so that the cast to float8 after it is exact on every backend
    (the interpreter's own cast rounds ties away from zero and flushes subnormals). x + 1.5 * 2^23
    * step lies in a binade whose spacing is the step: the fp32 add rounds x to a multiple of it."""
    exponent = tl.maximum(((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    magic = ((exponent + 147) << 23).to(tl.float32, bitcast=True) * 1.5  # 1.5 * 2^(exponent - 3 + 23)
    return (x + magic) - magic
