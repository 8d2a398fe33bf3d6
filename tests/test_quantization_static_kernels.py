"""The quantization kind's static Triton code (vibee/kinds/quantization/unpack.py, kernels.py, launch.py) is
ordinary Python: it imports and runs on its own (here in Triton's interpreter), and the generated
module carries a verbatim copy of it, launched with the spec's tiles."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from vibee.codegen.render import STATIC_COPY_MARKER, static_source
from vibee.kinds.quantization import gemv, kernels, launch, rope_epilogue, silu_mul, unpack, wgmma
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("in_features", [256, 200], ids=["even", "ragged"])
def test_the_gemv_takes_silu_gate_times_up_as_it_loads_x(dtype: torch.dtype, in_features: int):
    """silu_mul: one row [gate | up] in, the product with silu(gate) * up out, the same to the bit
    as the decoder spec's silu_mul kernel then the GEMV (a one-token step's down projection, one kernel)."""
    from tests.runtime.hf_models import generated

    qw, _ = int4_weight(24, in_features, 8, dtype)
    gate_up = (torch.randn(1, 2 * in_features, generator=torch.Generator().manual_seed(3)) * 3).to(dtype)
    gemv = launch.KernelConfig("gemv", 1, 16, 64, split_k=2)
    fused_y = launch._launch(gate_up, qw, launch._format(qw), None, gemv, None, silu_mul=True)
    gate, up = gate_up.chunk(2, dim=-1)
    two_kernels = launch._launch(generated().decoder.triton_silu_mul(gate, up), qw, launch._format(qw), None, gemv, None)
    assert torch.equal(fused_y, two_kernels) and not torch.equal(fused_y, launch._launch(gate, qw, launch._format(qw), None, gemv, None))
    with pytest.raises(ValueError, match="silu_mul and rope are the gemv kernel's"):
        launch._launch(gate_up, qw, launch._format(qw), None, launch.KernelConfig("mm", 16, 16, 64), None, silu_mul=True)
    with pytest.raises(ValueError, match="twice that with silu_mul"):
        launch._launch(gate, qw, launch._format(qw), None, gemv, None, silu_mul=True)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("width", [200, 20000], ids=["one-pass", "two-pass"])
def test_fp8_rows_of_gate_up_are_those_of_the_runtimes_silu_mul(dtype: torch.dtype, width: int):
    """The fp8 down projection's rows: silu(gate) * up rounded to fp8 in one kernel, the same to the
    bit as the decoder spec's silu_mul kernel and then fp8_rows."""
    from tests.runtime.hf_models import generated
    from vibee.kinds.quantization.fp8_kernels import fp8_rows

    gate_up = (torch.randn(2, 2 * width, generator=torch.Generator().manual_seed(4)) * 3).to(dtype)
    q, s = fp8_rows(gate_up, silu_mul=True)
    want_q, want_s = fp8_rows(generated().decoder.triton_silu_mul(*gate_up.chunk(2, dim=-1)))
    assert torch.equal(s, want_s) and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))


@interpreter_only
def test_a_tile_of_another_shape_computes_the_same_product():
    qw, weight = int4_weight(40, 512, 128, torch.float32)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(2))
    odd = (MatmulTile(kernel="mm", block_m=16, block_n=16, block_k=32, num_warps=2, num_stages=2, programs_per_sm=64),)
    tiles = tuple(launch.LaunchTile(**tile.model_dump()) for tile in odd)
    assert launch.pick_launch(tiles, 3, 40, 512, torch.device("cpu")).split_k == 4  # 3 programs want more: k is split, 4 tiles of 32 each
    y = launch._launch(x, qw, launch._format(qw), None, None, pick_from(tiles))
    torch.testing.assert_close(y.double(), x.double() @ weight.T, rtol=1e-5, atol=1e-5)


@interpreter_only
def test_a_wgmma_launch_where_it_cannot_run_computes_the_product_by_the_mm_kernel():
    """The interpreter has no wgmma (nor a CPU): the launch falls back to an mm tile that is right on every GPU."""
    qw, weight = int4_weight(40, 256, 128, torch.float16)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(3)).half()
    assert not launch._wgmma_takes(launch._format(qw), torch.float16, qw.scales, None, 256, 64, x.device)
    y = launch._launch(x, qw, launch._format(qw), None, launch.KernelConfig("wgmma", 256, 128, 64, 1, 8, 4), None)
    expected = x.double() @ weight.T
    assert (y.double() - expected).abs().max() <= 4e-3 * (x.double().abs() @ weight.abs().T).max()


def test_tma_brings_the_wgmma_operands_only_in_whole_aligned_chunks():
    """TMA's boxes start 16-byte aligned and span 16 bytes at least: 8 scales (16 uint8 zero points) per
    row; a weight whose rows hold fewer groups, or whose tensors start off 16 bytes, runs the mm kernel."""
    words = torch.zeros(64, 256, dtype=torch.int32)  # 2048 inputs
    scales = torch.zeros(64, 16, dtype=torch.bfloat16)  # groups of 128
    zeros = torch.zeros(64, 16, dtype=torch.uint8)
    assert wgmma.wgmma_tma_ready(words, scales, None, 128) and wgmma.wgmma_tma_ready(words, scales, zeros, 128)
    assert not wgmma.wgmma_tma_ready(words[:, :128], scales[:, :8], zeros[:, :8], 128)  # 8 zero points: half a box
    assert wgmma.wgmma_tma_ready(words[:, :128], scales[:, :8], None, 128)
    assert not wgmma.wgmma_tma_ready(words, torch.zeros(64, 9, dtype=torch.bfloat16), None, 128)  # 576 = 9 groups of 64
    assert not wgmma.wgmma_tma_ready(words, scales, zeros.to(torch.int32), 128)  # zero points as uint8 only
    assert not wgmma.wgmma_tma_ready(words, torch.zeros(64 * 16 + 1, dtype=torch.bfloat16)[1:].view(64, 16), None, 128)


_COMPILE_FOR_SM90 = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from vibee.kinds.quantization.wgmma import _max_registers, _w4_wgmma_kernel

constexprs = json.loads(sys.argv[1])
bm, bn, bk = constexprs["BLOCK_M"], constexprs["BLOCK_N"], constexprs["BLOCK_K"]
def desc(dtype, name, block):  # a TMA descriptor argument as wgmma_linear makes it
    return f"tensordesc<{name}{block},{gl.NVMMASharedLayout.get_default_for(block, dtype)!r}>"
signature = {"x_desc": desc(gl.bfloat16, "bf16", [bm, bk]), "w_desc": desc(gl.int32, "i32", [bn, bk // 8]),
             "s_desc": desc(gl.bfloat16, "bf16", [bn, 8]), "z_desc": desc(gl.uint8, "u8", [bn, 16]),
             "b_ptr": "*bf16", "y_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "stride_ym": "i32",
             "k_per_split": "i32"}
signature.update({name: "constexpr" for name in constexprs})
aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature)
           if name in ("y_ptr", "part_ptr", "count_ptr", "N", "K", "stride_ym", "k_per_split")}
source = GluonASTSource(fn=_w4_wgmma_kernel, signature=signature, constexprs=constexprs, attrs=aligned)
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4, "maxnreg": _max_registers(constexprs["WARPS"], bn, bm)})
import os, subprocess, tempfile
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
with tempfile.TemporaryDirectory() as tmp:  # ptxas's own report (Triton's compile keeps it quiet)
    open(os.path.join(tmp, "k.ptx"), "w").write(compiled.asm["ptx"])
    report = subprocess.run([ptxas, "-arch=sm_90a", "-v", os.path.join(tmp, "k.ptx"), "-o", os.path.join(tmp, "k.cubin")],
                            capture_output=True, text=True).stderr
print(json.dumps({"ptx": compiled.asm["ptx"], "shared": compiled.metadata.shared, "ptxas": report}))
"""


def compile_wgmma_for_sm90(**constexprs) -> dict:
    """wgmma.py's kernel compiled for an H100/H200 here (Triton's bundled ptxas, no GPU), in a
    process of its own: under TRITON_INTERPRET a Gluon kernel is the interpreter's, not compilable."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90, json.dumps(constexprs)], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(wgmma.gluon is None, reason="this Triton has no Gluon")
@pytest.mark.parametrize("block_m, block_n, block_k, warps, zeros, partials",
                         [(128, 128, 64, 4, True, False), (256, 128, 64, 8, False, True), (128, 64, 128, 4, True, True)])
def test_the_wgmma_kernel_compiles_for_sm90_to_async_wgmma_without_serializing(block_m, block_n, block_k, warps, zeros,
                                                                                partials):
    """Its point is the overlap: the k loop's wgmmas are issued async, with one wait per tile that
    leaves one outstanding, and ptxas keeps them so (its warning C7515: serialized, each waited for);
    each warpgroup is a partition of its own (its barrier a named one of 128 threads, not the
    program's), and the loader warp gives its registers back."""
    compiled = compile_wgmma_for_sm90(GROUP=128, ZERO_CODE=0 if zeros else 8, HAS_ZEROS=zeros, HAS_BIAS=True,
                                      SPLIT_K=2 if partials else 1, BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k,
                                      STAGES=4 if block_k == 64 else 3, WARPS=warps, ROWS_REGS=232)
    ptx, groups = compiled["ptx"], warps // 4
    assert ptx.count("wgmma.mma_async") == block_n // 64 * block_k // 16  # k16 steps of 64 weight rows, over the warpgroups
    assert "wgmma.wait_group.sync.aligned 1;" in ptx and compiled["shared"] <= 228 * 1024
    assert ptx.count("atom.global.gpu.acq_rel.add") == int(partials) * groups  # split-K: a counter per tile and warpgroup
    assert "Compiling entry function" in compiled["ptxas"] and "C7515" not in compiled["ptxas"], compiled["ptxas"]
    assert " 0 bytes spill stores" in compiled["ptxas"], compiled["ptxas"]
    named = set(re.findall(r"bar\.sync\s+(\d+), 128;", ptx))
    assert len(named) == groups and "bar.sync \t0;" not in ptx, named  # each warpgroup waits on its own
    assert re.search(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32 \t40;", ptx)  # the loader warp's registers


_GEMV_FOR_SM90 = """
import json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vibee.kinds.quantization.gemv import _qgemv_kernel

constexprs = json.loads(sys.argv[1])
signature = {"x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*u8", "b_ptr": "*bf16", "y_ptr": "*bf16",
             "part_ptr": "*fp32", "count_ptr": "*i32", "N": "i32", "K": "i32", "stride_qn": "i32", "stride_sn": "i32",
             "stride_zn": "i32", "k_per_split": "i32", "act_ptr": "*bf16", "pos_ptr": "*i64", "inv_freq_ptr": "*fp32",
             "scaling": "fp32", "slot_ptr": "*i64", "k_pages_ptr": "*bf16", "v_pages_ptr": "*bf16", "block_size": "i32",
             "stride_pb": "i32", "stride_ps": "i32", "stride_ph": "i32"}
signature.update({name: "constexpr" for name in constexprs})
compiled = triton.compile(ASTSource(fn=_qgemv_kernel, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
with tempfile.TemporaryDirectory() as tmp:
    open(os.path.join(tmp, "k.ptx"), "w").write(compiled.asm["ptx"])
    subprocess.run([os.path.join(bin_dir, "ptxas"), "-arch=sm_90a", os.path.join(tmp, "k.ptx"), "-o", os.path.join(tmp, "k.cubin")], check=True)
    sass = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-sass", os.path.join(tmp, "k.cubin")], capture_output=True, text=True).stdout
print(json.dumps({"ptx": compiled.asm["ptx"], "sass": sass}))
"""


def compile_gemv_for_sm90(**constexprs) -> dict:
    """The GEMV compiled for an H100/H200 here (no GPU), in a process of its own (not the interpreter's)."""
    import json
    import subprocess
    import sys

    defaults = dict(GROUP=128, SCALE_PER_TILE=True, CODE_BITS=4, FLIP=0, CODE_OFFSET=8.0, HAS_ZEROS=False, HAS_BIAS=False,
                    SPLIT_K=1, EVEN_K=True, BLOCK_N=64, BLOCK_K=128, ONE_LOP3=True, PACKED16=False, STAGES=1, SILU_MUL=False,
                    ROPE=False, HEAD_DIM=2, Q_HEADS=1, KV_HEADS=1, USE_LIBDEVICE=False)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _GEMV_FOR_SM90, json.dumps({**defaults, **constexprs})], capture_output=True,
                          text=True, env=env, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


_TILE_KERNEL_PTX_FOR_SM90 = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vibee.kinds.quantization import kernels

name, constexprs = sys.argv[1], json.loads(sys.argv[2])
names = ["x_ptr", "qw_ptr", "s_ptr", "z_ptr", "b_ptr", "y_ptr", "part_ptr", "count_ptr", "M", "N", "K", "stride_xm",
         "stride_qn", "stride_sn", "stride_zn", "stride_ym", "k_per_split"]
types = ["*bf16", "*i32", "*bf16", "*u8", "*bf16", "*bf16", "*fp32", "*i32"] + ["i32"] * 9
signature = dict(zip(names, types))
signature.update({c: "constexpr" for c in constexprs})
# as a launch specializes them: pointers, 2048-wide rows and splits divisible by 16
aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n.endswith("_ptr") or n.startswith("stride") or n in ("N", "K", "k_per_split")}
compiled = triton.compile(ASTSource(fn=getattr(kernels, name), signature=signature, constexprs=constexprs, attrs=aligned),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
print(json.dumps(compiled.asm["ptx"]))
"""

_TILE_CONSTEXPRS = {
    "_qmm_slices_kernel": dict(GROUP=128, SCALE_PER_TILE=True, CODE_OFFSET=8.0, HAS_ZEROS=False, HAS_BIAS=False, SPLIT_K=2,
                               EVEN_K=True, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, PACKED16=True),
    "_qmm_kernel": dict(GROUP=128, SCALE_PER_TILE=True, CODE_BITS=4, MAGIC=0x4B000000, OFFSET=8388616.0, HAS_ZEROS=False,
                        FRACTIONAL_ZEROS=False, HAS_BIAS=False, SPLIT_K=2, EVEN_K=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64,
                        GROUP_M=8, INPUT_PRECISION="tf32", JOIN_CODES=True, SWAP_AB=False, PACKED16=True),
}


@pytest.mark.parametrize("name", sorted(_TILE_CONSTEXPRS))
def test_the_tile_kernels_copy_their_words_16_bytes_at_a_time(name):
    """A k tile starts at a whole number of tiles (tl.multiple_of says so: Triton cannot see it
    through k0 // 8), so the pipelined copies of a tile's words into shared memory take 16 bytes a
    thread (cp.async.cg) rather than 4 (cp.async.ca). H100, 16 rows @ 2048x16384 by the slices
    kernel: 19.1 -> 15.1 us."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _TILE_KERNEL_PTX_FOR_SM90, name, json.dumps(_TILE_CONSTEXPRS[name])],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ptx = json.loads(done.stdout.splitlines()[-1])
    assert "cp.async.cg.shared.global" in ptx and "cp.async.ca.shared.global" not in ptx


@pytest.mark.parametrize("split", [1, 4])
def test_the_gemv_with_its_rope_epilogue_compiles_for_a_gpu(split):
    """The QKV GEMV's RoPE epilogue (Llama-3.2-1B heads, 2 a tile) compiles for sm_90 with the
    precise libdevice cos/sin (no approximate instructions), and stores more than the plain GEMV
    (the pages' k and v besides y)."""
    rope = compile_gemv_for_sm90(ROPE=True, HEAD_DIM=64, Q_HEADS=32, KV_HEADS=8, USE_LIBDEVICE=True, BLOCK_N=128,
                                 SPLIT_K=split, PACKED16=True)
    plain = compile_gemv_for_sm90(BLOCK_N=128, SPLIT_K=split, PACKED16=True)
    assert "cos.approx" not in rope["ptx"] and "sin.approx" not in rope["ptx"]
    assert "cos" not in plain["ptx"] and rope["ptx"].count("st.global") > plain["ptx"].count("st.global")


@pytest.mark.parametrize("one_lop3", [True, False])
def test_the_gemv_takes_one_integer_op_a_code_on_a_gpu(one_lop3):
    """The GEMV is bound by its arithmetic (H100: 1.1-1.6x the time of the same loads with none):
    on a GPU (ONE_LOP3) each code is masked and or-ed into 2^23 by one LOP3, where the compiler,
    given two immediates, spends two (the fp32 path: int8 codes, fractional zero points)."""
    compiled = compile_gemv_for_sm90(ONE_LOP3=one_lop3)
    codes = 64 * 128 // 128  # per thread and k tile: BLOCK_N * BLOCK_K over 4 warps' threads
    separate_ors = compiled["ptx"].count("1258291200")  # 0x4B000000 or-ed in by its own instruction
    lop3s = compiled["sass"].count("LOP3")
    if one_lop3:
        assert separate_ors == 0 and compiled["ptx"].count("lop3.b32") >= codes and lop3s < 1.5 * codes, lop3s
    else:
        assert separate_ors == codes and lop3s > 1.5 * codes, lop3s  # what the test tells apart


@pytest.mark.parametrize("zeros", [False, True])
def test_the_packed_gemv_takes_four_f16x2_fmas_a_word_on_a_gpu(zeros):
    """PACKED16 (4-bit codes, whole zero points): a word's 8 products are 4 packed f16x2 multiplies
    and adds, not 8 fp32 FMAs, and its sum goes to fp32 once."""
    word_rows = 64 * 16 // 128  # words per thread and k tile: BLOCK_N * BLOCK_K / 8 over 4 warps' threads
    packed = compile_gemv_for_sm90(PACKED16=True, HAS_ZEROS=zeros, CODE_OFFSET=0.0 if zeros else 8.0)
    ptx = packed["ptx"]
    assert ptx.count("fma.rn.f16x2") == 3 * word_rows and ptx.count("mul.rn.f16x2") == word_rows
    assert ptx.count("cvt.f32.f16") == 2 * word_rows
    fp32 = compile_gemv_for_sm90(PACKED16=False, HAS_ZEROS=zeros, CODE_OFFSET=0.0 if zeros else 8.0)
    assert "fma.rn.f16x2" not in fp32["ptx"] and fp32["sass"].count("FFMA") >= 8 * word_rows > 2 * packed["sass"].count("FFMA")


def test_the_gemv_takes_the_packed_products_wherever_they_run():
    """Unlike the tile kernels' 16-bit weights, the GEMV's f16x2 products take any x dtype and group
    (x is scaled into fp16's range a word at a time): 4-bit codes with whole zero points on a GPU;
    not int8 codes, fractional (GGUF Q4_1) zero points or the interpreter, and asking for it there
    is an error."""
    words = torch.zeros(8, 16, dtype=torch.int32)
    four, eight = launch._Format(4, 0, 8388616.0, 32, words), launch._Format(8, 0, 8388736.0, 32, words)
    gemv, cuda = launch.KernelConfig("gemv", 1, 64, 128), torch.device("cuda")
    whole, fractional = torch.zeros(8, 4, dtype=torch.uint8), torch.zeros(8, 4, dtype=torch.float16)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert launch._packed16(gemv, four, dtype, None, 128, cuda) and launch._packed16(gemv, four, dtype, whole, 128, cuda)
    assert not launch._packed16(gemv, four, torch.float32, None, 128, torch.device("cpu"))
    assert not launch._packed16(gemv, eight, torch.bfloat16, None, 128, cuda)
    assert not launch._packed16(gemv, four, torch.bfloat16, fractional, 128, cuda)
    assert not launch._packed16(launch.KernelConfig("gemv", 1, 64, 128, packed16=False), four, torch.bfloat16, None, 128, cuda)
    with pytest.raises(ValueError, match="packed16 takes 4-bit codes"):
        launch._packed16(launch.KernelConfig("gemv", 1, 64, 128, packed16=True), eight, torch.bfloat16, None, 128, cuda)


@pytest.mark.parametrize("module", [unpack, silu_mul, rope_epilogue, gemv, kernels, wgmma, launch],
                         ids=["unpack.py", "silu_mul.py", "rope_epilogue.py", "gemv.py", "kernels.py", "wgmma.py", "launch.py"])
def test_generated_module_carries_the_static_code_verbatim(module):
    path = Path(module.__file__)
    text = path.read_text(encoding="utf-8")
    copied = static_source(f"quantization/{path.name}")
    assert copied == text.split(STATIC_COPY_MARKER, 1)[1].strip("\n")  # the imports above the marker stay behind
    generated = (Path(__file__).resolve().parents[1] / "output" / "vibee_gen" / "igla_quantization.py").read_text(encoding="utf-8")
    assert copied in generated
