"""Quantized matmuls on a CPU, for QuantLinear's CPU forward.

Dequantizing the whole weight on every call made `--quant int8` serve 3.5x and int4 8.5x slower
than float32 on a CPU. Two paths replace it, chosen by the activation's rows:

- few rows (decode steps): torch's CPU weight-only kernels read the codes as they are, int8 with
  one scale per output row (`_weight_int8pack_mm`) and int4 with a scale and an offset per group
  of 32..256 inputs (`_weight_int4pack_mm_for_cpu`, over torch's own packing of the codes, made
  once per layer);
- many rows (prefill): the weight dequantized a block of output rows at a time into the compute
  dtype and multiplied densely, where bf16 runs on the CPU's matrix units. The block bounds the
  scratch memory (an lm_head of 128k rows is never dense at once).

The kernels run in the compute dtype (the spec's bf16 by default); layouts they do not take
(asymmetric or grouped int8, fewer than 16 output rows for int4, ...) take the dense path.

Static code, copied (from the marker below on) into every generated quantization module.
"""

from __future__ import annotations

import sys
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

# ---- copied into generated modules from here ----

# Rows of activation up to which torch's kernels beat dequantizing the weight. Measured on a 2-core
# Xeon with AMX (torch 2.13, bf16; ms per call, against float32's nn.Linear):
#   1152x384 weight, int4:  1 row 0.016 (fp32 0.022)  16 rows 0.086 (0.099)  64 rows 0.33 (0.21), dense path 0.67
#   2048x2048 weight, int4: 16 rows 0.84 (1.12)  128 rows 6.0 (3.7), dense path ~3.4
# The kernels cost about 1.5x float32 per row beyond a few rows; dequantizing costs ~1 ns a weight.
CPU_KERNEL_MAX_ROWS = 64
CPU_INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # the group sizes torch's CPU int4 kernel takes
CPU_INT4_KERNEL_ROWS = 16  # its output rows come in blocks of this many
CPU_DEQUANT_ROWS = 2048  # output rows the dense path dequantizes at a time

CpuKernel = Callable[[torch.Tensor], torch.Tensor]  # [m, in] in the compute dtype -> [m, out]


def int4_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """The stored 4-bit fields of packed words (int32 or uint8, little-endian), as uint8 [out, in]:
    the codes, offset by 8 when signed."""
    packed = qweight.contiguous().view(torch.uint8)  # byte j of a row holds fields 2j (low) and 2j + 1
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(qweight.shape[0], -1)


def cpu_int4_kernel(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group_size: int) -> CpuKernel | None:
    """torch's int4 CPU kernel over a packed 4-bit weight, or None where it does not apply.

    The kernel computes w = (field - 8) * scale + offset per group: a signed code is stored as
    field = code + 8 (offset 0); an asymmetric one as field = code with w = (code - zero) * scale,
    so offset = (8 - zero) * scale. A group larger than 256 is several of the kernel's groups
    sharing a scale."""
    out_features = qweight.shape[0]
    kernel_group = next((g for g in CPU_INT4_KERNEL_GROUPS if group_size % g == 0), None)
    if sys.byteorder != "little" or kernel_group is None or out_features % CPU_INT4_KERNEL_ROWS:
        return None
    packed = torch._convert_weight_to_int4pack_for_cpu(int4_nibbles(qweight).to(torch.int32), 2)
    scale = scales.to(torch.float32)
    offset = torch.zeros_like(scale) if zeros is None else (8 - zeros.to(torch.float32)) * scale
    per_group = torch.stack([scale, offset], dim=-1).repeat_interleave(group_size // kernel_group, dim=1)
    scales_and_zeros = per_group.transpose(0, 1).contiguous().to(scales.dtype)  # [groups, out, 2]
    return lambda x: torch._weight_int4pack_mm_for_cpu(x, packed, kernel_group, scales_and_zeros)


def cpu_int8_kernel(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group_size: int) -> CpuKernel | None:
    """torch's int8 CPU kernel (one scale per output row, signed codes), or None."""
    if zeros is not None or qweight.dtype != torch.int8 or group_size != qweight.shape[1]:
        return None
    codes, per_row = qweight.contiguous(), scales[:, 0].contiguous()
    return lambda x: torch._weight_int8pack_mm(x, codes, per_row)


class CpuQuantLinear(Protocol):
    """What cpu_quant_linear reads of a generated QuantLinear."""

    out_features: int
    bias: torch.Tensor | None  # in the compute dtype
    scales: torch.Tensor  # their dtype is the compute dtype

    def cpu_kernel(self) -> CpuKernel | None: ...

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor: ...


def cpu_quant_linear(x: torch.Tensor, layer: CpuQuantLinear) -> torch.Tensor:
    """layer(x) on a CPU, in the compute dtype, returned in x's dtype: the layer's torch kernel
    for up to CPU_KERNEL_MAX_ROWS rows, else its weight dequantized CPU_DEQUANT_ROWS output rows
    at a time and multiplied densely."""
    rows, dtype, bias = x.reshape(-1, x.shape[-1]), layer.scales.dtype, layer.bias
    kernel = layer.cpu_kernel() if rows.shape[0] <= CPU_KERNEL_MAX_ROWS else None
    if kernel is not None:
        y = kernel(rows.to(dtype).contiguous())
        if bias is not None:
            y += bias
    else:
        n, rows = layer.out_features, rows.to(dtype)
        blocks = [F.linear(rows, layer.dequantize_rows(start, min(start + CPU_DEQUANT_ROWS, n)),
                           None if bias is None else bias[start:start + CPU_DEQUANT_ROWS])
                  for start in range(0, n, CPU_DEQUANT_ROWS)]
        y = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)
    return y.view(*x.shape[:-1], layer.out_features).to(x.dtype)
