"""silu(gate) * up, rounded as the runtime's silu_mul kernel rounds it (silu to the inputs' dtype
before the multiply, the product after it), for the kernels that take a down projection's input
as [gate | up]: the int GEMV (gemv.py) and the rounding of fp8 rows (fp8_kernels.py). Both
quantization templates copy it from the marker on, so each generated module stands alone.
"""

import triton
import triton.language as tl

# ---- copied into generated modules from here ----

@triton.jit
def _silu_times_up(gate, up):
    """silu(gate) * up in gate's dtype (both as loaded), in fp32 arithmetic."""
    g32 = gate.to(tl.float32)
    silu = (g32 / (1.0 + tl.exp(-g32))).to(gate.dtype)
    return (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
