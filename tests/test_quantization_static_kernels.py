"""The quantization kind's static Triton code (vibee/kinds/quantization/unpack.py, kernels.py, launch.py) is
ordinary Python: it imports and runs on its own (here in Triton's interpreter), and the generated
module carries a verbatim copy of it, launched with the spec's tiles."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from vibee.codegen.render import STATIC_COPY_MARKER, static_source
from vibee.kinds.quantization import kernels, launch, unpack
from vibee.kinds.quantization.config import QuantizationConfig
from vibee.kinds.quantization.tiles import MatmulTile

interpreter_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs Triton kernels on the CPU: set TRITON_INTERPRET=1")


@dataclass
class Weight:
    """The fields of a generated QuantizedWeight that the launcher reads."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    shape: tuple[int, int]
    bits: int
    group_size: int


def int4_weight(out_features: int, in_features: int, group: int, dtype: torch.dtype) -> tuple[Weight, torch.Tensor]:
    """Random signed 4-bit codes packed 8 per int32 word (stored + 8, little-endian), random
    scales, and the exact float64 weight they stand for."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (out_features, in_features), generator=g)
    scales = (torch.rand(out_features, in_features // group, generator=g) * 0.02 + 0.001).to(dtype)
    nibbles = (codes + 8).reshape(out_features, -1, 8)
    words = sum(nibbles[..., k] << (4 * k) for k in range(8))
    packed = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    weight = codes.double() * scales.double().repeat_interleave(group, dim=1)
    return Weight(packed, scales, None, (out_features, in_features), 4, group), weight


def launch_tiles(config: QuantizationConfig) -> tuple[launch.LaunchTile, ...]:
    return tuple(launch.LaunchTile(**tile.model_dump()) for tile in config.tiles)


def pick_from(tiles: tuple[launch.LaunchTile, ...]):
    return lambda m, n, k, code_bits, group_size, device: launch.pick_launch(tiles, m, n, k, device)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows", [1, 5, 70])  # the GEMV, the skinny and the prefill tiles
def test_launcher_runs_the_kernels_with_the_default_tiles(rows: int, dtype: torch.dtype):
    qw, weight = int4_weight(24, 256, 64, dtype)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = launch._launch(x, qw, launch._format(qw), None, None, pick_from(launch_tiles(QuantizationConfig())))
    expected = x.double() @ weight.T
    tolerance = (1e-5 if dtype == torch.float32 else 4e-3) * (x.double().abs() @ weight.abs().T).max()
    assert y.dtype == dtype and (y.double() - expected).abs().max() <= tolerance


@interpreter_only
def test_a_tile_of_another_shape_computes_the_same_product():
    qw, weight = int4_weight(40, 512, 128, torch.float32)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(2))
    odd = (MatmulTile(kernel="mm", block_m=16, block_n=16, block_k=32, num_warps=2, num_stages=2, programs_per_sm=64),)
    tiles = tuple(launch.LaunchTile(**tile.model_dump()) for tile in odd)
    assert launch.pick_launch(tiles, 3, 40, 512, torch.device("cpu")).split_k == 4  # 3 programs want more: k is split, 4 tiles of 32 each
    y = launch._launch(x, qw, launch._format(qw), None, None, pick_from(tiles))
    torch.testing.assert_close(y.double(), x.double() @ weight.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module", [unpack, kernels, launch], ids=["unpack.py", "kernels.py", "launch.py"])
def test_generated_module_carries_the_static_code_verbatim(module):
    path = Path(module.__file__)
    text = path.read_text(encoding="utf-8")
    copied = static_source(f"quantization/{path.name}")
    assert copied == text.split(STATIC_COPY_MARKER, 1)[1].strip("\n")  # the imports above the marker stay behind
    generated = (Path(__file__).resolve().parents[1] / "output" / "vibee_gen" / "igla_quantization.py").read_text(encoding="utf-8")
    assert copied in generated
