"""Which output tile and split of k a matmul program takes, shared by the quantized matmul's
kernels (kernels.py) and the fp8 one (fp8_kernels.py): both templates copy it from the marker on,
so each generated module stands alone.
"""

import triton
import triton.language as tl

# ---- copied into generated modules from here ----

@triton.jit
def _program_tile(M, N, K, k_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile and split of k: its rows of x (rm) and of the weight (rn), their
    masks and in-range copies (int64; rows past the end wrap around to the first rows and are not
    stored: when the 64 rows past the end of 192 all read row 0, every program's loads of that one
    line meeting in L2, 192 rows took 1.45x the time of 256 (H200, 14336 x 4096: 150.5 against
    103.5 us; wrapped, 103.7 us)), and the split's [k_begin, k_end). Tiles go in column bands of GROUP_M row tiles, so that programs that
    run together share weight tiles in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * tiles_n
    first_m = (pid // band) * GROUP_M
    band_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % band_m
    pid_n = (pid % band) // band_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    k_begin = tl.program_id(1) * k_per_split
    return (rm, rn, m_mask, n_mask, (rm % M).to(tl.int64), (rn % N).to(tl.int64),
            k_begin, tl.minimum(k_begin + k_per_split, K))
