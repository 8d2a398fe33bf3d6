"""The quantization spec drives the generated module: change one knob in the shipped spec's text,
regenerate, and the module behaves differently in the way the knob says; bad values are spec
errors at the offending line."""

from __future__ import annotations

import os
import re

import pytest
import torch

from vibee.kinds.quantization.config import QuantizationConfig
from vibee.frontend.errors import SpecError


# A spec variant's generated suite, less the kernel checks on fixed formats (format_matrix): they
# run the same static kernels on the same inputs whatever the spec says (the shipped suite has them).
VARIANT_SUITE = ("-m", "not format_matrix")
# A method variant chooses other codes for a model's layers; the kernels read codes as the shipped
# spec's do, so its suite leaves out the kernel runs (kernels) and the RTN-written spec cases.
METHOD_SUITE = ("-m", "not format_matrix and not kernels", "-k", "not test_spec_case")
# Where a variant's format is one of the fixed ones (int8 per channel; asymmetric int4 in int32 words, groups
# of 128), its generated kernel tests on a given format (the `spec` cases of the kernel matrix, masked loads,
# 576-wide rows) run the same static kernels on the same inputs as the shipped suite's: they pass against a
# module generated without the knob, so the variant's suite leaves them out.
SHIPPED_KERNEL_RUNS = ("not test_triton_quant_linear_matches_the_reference_in_the_interpreter"
                       " and not test_triton_rows_that_no_tile_divides_use_masked_loads"
                       " and not test_the_specs_launches_take_576_wide_rows_in_16_bit")



def with_config(text: str, key: str, value: object) -> str:
    """The spec text with config `key` set to `value` (the key must be in the spec's config)."""
    line = re.compile(rf"^(  {key}:[ \t]*)([^#\n]*?)([ \t]*#.*)?$", re.M)
    changed, count = line.subn(lambda m: f"{m.group(1)}{value}{m.group(3) or ''}", text, count=1)
    assert count == 1, f"config key {key!r} not found in the spec"
    return changed


def weight(out_features: int = 16, in_features: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.02


def mean_error(module, w: torch.Tensor) -> float:
    return (module.dequantize(module.quantize_weight(w)).double() - w.double()).abs().mean().item()


@pytest.fixture
def quantization_spec(spec_text) -> str:
    return spec_text("quantization")


def test_bits_8_to_4_packs_codes_into_fewer_levels_with_more_error(gen_from_text, quantization_spec):
    int8_variant = gen_from_text(with_config(quantization_spec, "bits", 8), "igla_quantization")
    int8 = int8_variant.impl
    int4 = gen_from_text(with_config(quantization_spec, "bits", 4), "igla_quantization").impl
    w = weight()
    q8, q4 = int8.quantize_weight(w), int4.quantize_weight(w)

    assert (q8.qweight.dtype, tuple(q8.qweight.shape)) == (torch.int8, (16, 256))  # one code per byte
    assert (q4.qweight.dtype, tuple(q4.qweight.shape)) == (torch.int32, (16, 32))  # 8 codes per word
    levels8 = int8.unpack_codes(q8.qweight).unique().numel()
    levels4 = int4.unpack_codes(q4.qweight).unique().numel()
    assert levels4 <= 16 < levels8 <= 256
    assert mean_error(int4, w) > 8 * mean_error(int8, w)
    # Its generated suite too (torch's int8 CPU kernel, per channel), but the spec's cases: they are written for int4.
    assert int8_variant.run_tests(*VARIANT_SUITE, "-k", f"not test_spec_case and {SHIPPED_KERNEL_RUNS}") == 0


def test_group_size_128_to_32_gives_four_times_the_scales(gen_from_text, quantization_spec):
    g128 = gen_from_text(quantization_spec, "igla_quantization").impl
    # The shipped spec leaves group_size to the bits (128 for 4): write it, as a user would.
    assert "\n  group_size:" not in quantization_spec
    g32_spec = quantization_spec.replace("\nconfig:\n", "\nconfig:\n  group_size: 32\n", 1)
    g32 = gen_from_text(g32_spec, "igla_quantization").impl
    w = weight()
    assert tuple(g128.quantize_weight(w).scales.shape) == (16, 2)
    assert tuple(g32.quantize_weight(w).scales.shape) == (16, 8)

    # One large weight at input 40 moves the scale of its own group only: group 0 of 128, group 1 of 32.
    bumped = w.clone()
    bumped[5, 40] = 1.0
    for module, group in ((g128, 0), (g32, 1)):
        changed = module.quantize_weight(w).scales != module.quantize_weight(bumped).scales
        assert changed.nonzero().tolist() == [[5, group]]
    assert mean_error(g32, w) < mean_error(g128, w)


def test_symmetric_false_adds_zero_points_and_fits_positive_weights(gen_from_text, quantization_spec):
    symmetric = gen_from_text(quantization_spec, "igla_quantization")
    asymmetric = gen_from_text(with_config(quantization_spec, "symmetric", "false"), "igla_quantization")
    w = weight().abs()  # all positive: symmetric codes waste their negative half

    assert symmetric.impl.quantize_weight(w).zeros is None
    zeros = asymmetric.impl.quantize_weight(w).zeros
    assert zeros.dtype == torch.uint8 and tuple(zeros.shape) == (16, 2)
    assert (asymmetric.impl.QMIN, asymmetric.impl.QMAX) == (0, 15)
    assert mean_error(asymmetric.impl, w) < 0.75 * mean_error(symmetric.impl, w)
    layer = asymmetric.impl.QuantLinear.from_linear(torch.nn.Linear(256, 16))
    assert "zeros" in layer.state_dict()
    assert asymmetric.run_tests(*VARIANT_SUITE, "-k", SHIPPED_KERNEL_RUNS) == 0  # the generated suite, spec cases included


def fp8_spec(text: str) -> str:
    """The shipped spec with code_type fp8 (bits 8, per channel), without its two cases about
    integer groups (576-wide rows take groups of 64; a 100-wide row raises): fp8 has one scale per
    row; and 8 bits a weight compress bf16 2x, not int4's 3.8x."""
    text = text.replace("  bits: 4", "  bits: 8\n  code_type: fp8", 1).replace("min_compression: 3.8", "min_compression: 1.99")
    start, end = text.index("      - name: narrow_model_width"), text.index("  - name: pack_int4")
    return text[:start] + text[end:]


def test_code_type_fp8_stores_e4m3_codes_per_channel(gen_from_text, quantization_spec):
    fp8 = gen_from_text(fp8_spec(quantization_spec), "igla_quantization")
    impl = fp8.impl
    assert impl.CODE_TYPE == "fp8" and (impl.QMIN, impl.QMAX) == (-448, 448)
    w = weight()
    qw = impl.quantize_weight(w)
    assert qw.qweight.dtype == torch.float8_e4m3fn and qw.scales.shape == (16, 1) and qw.zeros is None
    # e4m3's relative step: the error follows each weight's size, not the row's largest one
    small = w.abs() < w.abs().amax(dim=1, keepdim=True) / 64
    err = (impl.dequantize(qw).float() - w).abs()
    assert (err[small] <= w.abs()[small] / 16 + qw.scales.float().expand_as(w)[small] * 2**-10 + 1e-6).all()
    int8 = gen_from_text(with_config(quantization_spec, "bits", 8), "igla_quantization").impl
    assert mean_error(int8, w) < mean_error(impl, w)  # uniform int8 levels beat 3 mantissa bits on plain weights ...
    w[:, 0] = 100 * w.abs().amax(dim=1)  # ... but not beside an outlier, which spreads int8's levels thin
    assert mean_error(impl, w) < mean_error(int8, w) / 4
    assert fp8.run_tests(*VARIANT_SUITE) == 0  # the generated suite (fp8 codes, W8A8 kernels in the interpreter) passes


def with_fp8_tiles(text: str, rows: str, max_rows: int = 16) -> str:
    """The spec text with its fp8_tiles table replaced by `rows` (lines of "    - {...}") and fp8_triton_max_rows set."""
    changed, count = re.subn(r"^  fp8_tiles:\n(?:    - .*\n)+", "  fp8_tiles:\n" + rows, text, count=1, flags=re.M)
    assert count == 1, "the spec has no fp8_tiles: table"
    return with_config(changed, "fp8_triton_max_rows", max_rows)


def test_fp8_tiles_and_triton_rows_choose_the_w8a8_launch(gen_from_text, quantization_spec):
    rows = ("    - {max_m: 4, block_m: 16, block_n: 32, block_k: 64, num_warps: 2, num_stages: 2}\n"
            "    - {block_m: 32, block_n: 16, block_k: 32, num_warps: 1, num_stages: 1}\n")
    variant = gen_from_text(with_fp8_tiles(fp8_spec(quantization_spec), rows, max_rows=3), "igla_quantization")
    impl = variant.impl
    assert [impl.fp8_tile(m) for m in (1, 4, 5, 300)] == [(16, 32, 64, 2, 2)] * 2 + [(32, 16, 32, 1, 1)] * 2
    cpu = torch.device("cpu")
    assert impl.TRITON_MAX_ROWS == 3 and impl.triton_takes(3, 40, 256, cpu) and not impl.triton_takes(4, 40, 256, cpu)
    shipped = gen_from_text(fp8_spec(quantization_spec), "igla_quantization").impl
    assert shipped.fp8_tile(5) == (16, 64, 128, 4, 4) and shipped.triton_takes(16, 40, 256, cpu)
    explained = variant.spec.config.derived()  # vibee explain
    assert explained["fp8 tile for M <= 4"] == "16x32x64, 2 warps, 2 stages" and "fp8 tile for M any" in explained
    assert explained["fp8 Triton kernel"].startswith("up to 3 rows") and not any(k.startswith("tile for") for k in explained)
    # its suite: the W8A8 products on these tiles in the interpreter, the Triton/cuBLASLt split at 3 rows
    assert variant.run_tests(*VARIANT_SUITE, "-k", "fp8 or w8a8 or cublas") == 0


@pytest.mark.parametrize("rows, message", [
    ("    - {max_m: 16, block_m: 16, block_n: 64, block_k: 128}\n", "the last row of fp8_tiles must cover every product"),
    ("    - {max_m: 64, block_m: 64, block_n: 64, block_k: 128}\n    - {max_m: 16, block_m: 16, block_n: 64, block_k: 128}\n"
     "    - {block_m: 128, block_n: 128, block_k: 128}\n", r"fp8_tiles\[1\] is never used: its max_m 16 is not above"),
    ("    - {block_m: 64, block_n: 64, block_k: 128}\n    - {max_m: 16, block_m: 16, block_n: 64, block_k: 128}\n"
     "    - {block_m: 128, block_n: 128, block_k: 128}\n", r"fp8_tiles\[1:\] are never used: fp8_tiles\[0\] has no max_m"),
    ("    - {block_m: 128, block_n: 128, block_k: 16}\n", "block_k must be a power of two from 32 to 256, got 16"),
    ("    - {block_m: 128, block_n: 100, block_k: 128}\n", "block_n must be a power of two from 16 to 256, got 100"),
], ids=["no-catch-all", "shadowed", "catch-all-first", "block-k", "block-n"])
def test_bad_fp8_tiles_are_spec_errors(gen_from_text, quantization_spec, rows, message):
    with pytest.raises(SpecError) as caught:
        gen_from_text(with_fp8_tiles(quantization_spec, rows), "igla_quantization")
    rendered = caught.value.render()
    assert re.search(r"igla_quantization\.vibee:\d+:\d+: error: .*" + message, rendered), rendered


def test_code_type_fp8_with_integer_settings_is_an_error_at_its_line(gen_from_text, quantization_spec):
    text = quantization_spec.replace("  bits: 4", "  bits: 4\n  code_type: fp8", 1)
    with pytest.raises(SpecError) as caught:
        gen_from_text(text, "igla_quantization")
    assert "code_type fp8 takes bits 8" in caught.value.render() and "got bits 4, group_size 128" in caught.value.render()


def test_bits_3_is_an_error_listing_the_allowed_values(gen_from_text, quantization_spec):
    with pytest.raises(SpecError) as caught:
        gen_from_text(with_config(quantization_spec, "bits", 3), "igla_quantization")
    message = caught.value.render()
    assert re.search(r"igla_quantization\.vibee:\d+:\d+: error: bits must be one of 4, 8, got 3", message), message


@pytest.mark.parametrize("value", [100, 16, 2048, 0])
def test_group_size_must_be_a_power_of_two_in_range(value):
    with pytest.raises(ValueError, match=rf"group_size must be a power of two from 32 to 1024, or -1 .*got {value}"):
        QuantizationConfig(group_size=value)


def test_int8_defaults_to_one_group_per_output_channel():
    assert QuantizationConfig().group_size == 128
    assert QuantizationConfig(bits=8).group_size == -1
    assert QuantizationConfig(bits=8, group_size=64).group_size == 64


def test_overriding_bits_takes_the_new_bits_default_group_size(gen_from_text, quantization_spec):
    shipped = gen_from_text(quantization_spec, "igla_quantization").spec.config  # writes group_size: 128
    int8 = shipped.with_overrides({"bits": 8, "compute_dtype": "fp16"})
    assert (int8.bits, int8.group_size, int8.compute_dtype) == (8, -1, "fp16")
    assert shipped.with_overrides({"bits": 8, "group_size": 64}).group_size == 64
    assert int8.with_overrides({"bits": 4}).group_size == 128
    assert shipped.with_overrides({"symmetric": False}).group_size == 128  # only bits moves it
    with pytest.raises(ValueError, match="bits must be one of 4, 8"):
        shipped.with_overrides({"bits": 2})


def test_derived_figures_count_scales_and_zero_points():
    figures = QuantizationConfig().derived()
    assert figures["bits per weight"].startswith("4.125 ")  # 4 + 16-bit scale / 128
    assert figures["compression vs bf16"] == "3.88x"
    asymmetric = QuantizationConfig(symmetric=False, group_size=32).derived()
    assert asymmetric["bits per weight"].startswith("4.750 ")  # 4 + (16 + 8) / 32
    assert QuantizationConfig(bits=8).derived()["compression vs bf16"] == "2.00x"


# --- the kernels' tile table ----------------------------------------------------------------------

SMALL_TILES = """\
  tiles:
    - {kernel: gemv, max_m: 1, block_n: 16, block_k: 32, num_warps: 2, num_stages: 2, programs_per_sm: 64}
    - {kernel: mm, max_m: 8, block_m: 16, block_n: 32, block_k: 256, num_warps: 2, num_stages: 2, programs_per_sm: 4, swap_ab: true, join_codes: true}
    - {kernel: mm, max_m: 200, block_m: 32, block_n: 16, block_k: 32, num_warps: 2, num_stages: 2}
    - {kernel: dense, block_n: 32, block_k: 64, num_warps: 4, num_stages: 1}
"""


def with_tiles(text: str, tiles: str) -> str:
    changed, count = re.subn(r"^  tiles:\n(?:    - .*\n)+", tiles, text, count=1, flags=re.M)
    assert count == 1, "the spec has no tiles: table"
    return changed


def test_default_tiles_are_the_measured_h100_h200_launches():
    gemv_wide, gemv, skinny, mid, lm_head, prefill = QuantizationConfig().tiles
    assert (gemv_wide.min_n, gemv_wide.block_n, gemv_wide.num_warps, gemv.block_n, gemv.num_warps) == (16384, 128, 8, 64, 4)
    assert (gemv.block_k, gemv.num_stages, gemv.programs_per_sm) == (128, 3, 8)
    assert (skinny.kernel, skinny.max_m, skinny.block_m, skinny.block_n, skinny.block_k) == ("slices", 16, 16, 128, 128)
    assert (mid.kernel, mid.max_m, mid.block_m, mid.block_n, mid.min_block_n, mid.block_k, mid.programs_per_sm) == ("mm", 128, 64, 128, 64, 64, 2)
    assert (mid.swap_ab, mid.join_codes, lm_head.swap_ab, lm_head.join_codes) == (True, True, False, False)
    assert (lm_head.kernel, lm_head.max_m, lm_head.min_n) == ("mm", None, 32768)
    assert (prefill.kernel, prefill.max_m, prefill.min_n) == ("dense", None, 0)


def test_the_specs_tiles_are_the_modules_launches(gen_from_text, quantization_spec):
    small = gen_from_text(with_tiles(quantization_spec, SMALL_TILES), "igla_quantization").impl
    cpu = torch.device("cpu")
    assert small.pick_config(1, 4096, 4096, 4, 128, cpu) == small.KernelConfig("gemv", 1, 16, 32, 16, num_warps=2, num_stages=2)
    assert small.pick_config(8, 4096, 4096, 4, 128, cpu) == small.KernelConfig("mm", 16, 32, 256, 4, num_warps=2, num_stages=2,
                                                                                join_codes=True, swap_ab=True)
    assert small.pick_config(9, 4096, 4096, 4, 128, cpu) == small.KernelConfig("mm", 32, 16, 32, 1, num_warps=2, num_stages=2)
    assert small.pick_config(201, 4096, 4096, 4, 128, cpu) == small.KernelConfig("dense", 1, 32, 64, 1, num_warps=4, num_stages=1)


def test_a_tile_row_for_a_gpu_reaches_the_module_and_applies_only_there(gen_from_text, quantization_spec, monkeypatch):
    tiles = SMALL_TILES.replace("  tiles:\n", "  tiles:\n    - {kernel: mm, max_m: 8, block_m: 16, block_n: 64, block_k: 64, "
                                               "gpu: H200}\n", 1)
    small = gen_from_text(with_tiles(quantization_spec, tiles), "igla_quantization").impl
    cpu = torch.device("cpu")
    assert small.TILES[0].gpu == "H200" and small.TILES[1].gpu is None
    assert small.pick_config(8, 4096, 4096, 4, 128, cpu).block_n == 32  # not a GPU: the H200's row is passed over
    monkeypatch.setattr(small, "_device_name", lambda device: "NVIDIA H200")
    small.pick_config.cache_clear()  # its launches are kept per device
    assert small.pick_config(8, 4096, 4096, 4, 128, cpu) == small.KernelConfig("mm", 16, 64, 64, 1)
    assert small.pick_config(1, 4096, 4096, 4, 128, cpu).kernel == "mm"  # its max_m 8 covers one row too


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs Triton kernels on the CPU: set TRITON_INTERPRET=1")
def test_changed_tiles_still_compute_the_product(gen_from_text, quantization_spec):
    small = gen_from_text(with_tiles(quantization_spec, SMALL_TILES), "igla_quantization")
    # The generated suite's tile tests: the module's table is the spec's, and each row's launch
    # gives the reference's product in the interpreter.
    assert small.run_tests("-k", "tile") == 0


@pytest.mark.parametrize(
    "tiles, message",
    [
        ("    - {kernel: mm, block_m: 16, block_n: 100, block_k: 64}\n", "block_n must be a power of two from 16 to 256, got 100"),
        ("    - {kernel: mm, block_m: 16, block_n: 64, block_k: 16}\n", "block_k must be a power of two from 32 to 512, got 16"),
        ("    - {kernel: gemv, max_m: 4, block_n: 64, block_k: 128}\n    - {kernel: mm, block_m: 16, block_n: 64, block_k: 64}\n",
         "a gemv tile takes one activation row"),
        ("    - {kernel: mm, max_m: 16, block_m: 16, block_n: 64, block_k: 64}\n", "the last row of tiles must cover every product"),
        ("    - {kernel: mm, block_m: 16, block_n: 64, block_k: 64}\n    - {kernel: mm, block_m: 64, block_n: 64, block_k: 64}\n",
         r"tiles\[1\] is never used: tiles\[0\] comes first"),
        ("    - {kernel: gemv, max_m: 1, block_n: 64, block_k: 128, swap_ab: true}\n    - {kernel: mm, block_m: 16, block_n: 64, block_k: 64}\n",
         "swap_ab is the mm kernel's"),
        ("    - {kernel: slices, max_m: 16, block_m: 16, block_n: 64, block_k: 128, join_codes: true}\n"
         "    - {kernel: mm, block_m: 16, block_n: 64, block_k: 64}\n", "join_codes is the mm and dense kernels'"),
        ("    - {kernel: wgmma, block_m: 64, block_n: 64, block_k: 64, num_warps: 2}\n", "num_warps must be 4 or 8, got 2"),
        ("    - {kernel: wgmma, block_m: 64, block_n: 64, block_k: 64, num_warps: 8}\n", "must be multiples of 128, got 64 and 64"),
        ("    - {kernel: wgmma, block_m: 256, block_n: 128, block_k: 64}\n", "keeps 256 fp32 accumulators per thread"),
        ("    - {kernel: wgmma, block_m: 64, block_n: 128, block_k: 256}\n", "takes block_k 64 or 128"),
        ("    - {kernel: mm, block_m: 16, block_n: 64, block_k: 64, gpu: H200}\n", "no max_m, min_n 0 and no gpu"),
        ("    - {kernel: mm, block_m: 16, block_n: 64, block_k: 64, gpu: \"H200'; x\"}\n    - {kernel: dense, block_n: 64, block_k: 64}\n",
         "gpu must be part of a GPU's name"),
        ("    - {kernel: mm, block_m: 16, block_n: 64, block_k: 64, gpu: H200}\n    - {kernel: mm, max_m: 8, block_m: 16, block_n: 64, "
         "block_k: 64, gpu: H200}\n    - {kernel: dense, block_n: 64, block_k: 64}\n", r"tiles\[1\] is never used"),
    ],
    ids=["block_n", "block_k", "gemv-rows", "no-catch-all", "shadowed", "swap-gemv", "join-slices", "wgmma-warps",
         "wgmma-rows", "wgmma-registers", "wgmma-k", "gpu-catch-all", "gpu-name", "gpu-shadowed"],
)
def test_bad_tiles_are_spec_errors(gen_from_text, quantization_spec, tiles, message):
    with pytest.raises(SpecError) as caught:
        gen_from_text(with_tiles(quantization_spec, "  tiles:\n" + tiles), "igla_quantization")
    rendered = caught.value.render()
    assert re.search(r"igla_quantization\.vibee:\d+:\d+: error: .*" + message, rendered), rendered


def test_method_gptq_quantizes_stage_by_stage_over_calibration_inputs(gen_from_text, quantization_spec):
    rtn = gen_from_text(quantization_spec, "igla_quantization").impl
    variant = gen_from_text(with_config(quantization_spec, "method", "gptq"), "igla_quantization")
    gptq = variant.impl
    assert (rtn.METHOD, gptq.METHOD) == ("rtn", "gptq")

    def toy(module):
        torch.manual_seed(0)
        model = torch.nn.Sequential()
        model.layers = torch.nn.ModuleList(torch.nn.Linear(256, 256) for _ in range(2))
        model.lm_head = torch.nn.Linear(256, 64)
        return model

    # Inputs whose features move together, like a layer's: GPTQ's codes make up for that.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, 256, generator=g) + 0.1 * torch.randn(512, 256, generator=g)

    def run(model):
        h = x
        for layer in model.layers:
            h = torch.relu(layer(h))
        return model.lm_head(h)

    reference = toy(None)
    expected = run(reference).detach()
    errors = {}
    for name, module in (("rtn", rtn), ("gptq", gptq)):
        model, passes, stages = toy(None), [], []
        stats = module.quantize_model(model, [], lambda: passes.append(run(model)), lambda done, total: stages.append((done, total)))
        assert stats.layers_quantized == 3
        errors[name] = (run(model) - expected).norm().item()
        if name == "gptq":  # one calibration pass per stage: layers.0, layers.1, then lm_head
            assert len(passes) == 3 and stages == [(1, 3), (2, 3), (3, 3)]
        else:
            assert passes == []  # round to nearest needs no calibration
    assert errors["gptq"] < 0.7 * errors["rtn"], errors
    with pytest.raises(ValueError, match="calibrate"):
        gptq.quantize_model(toy(None), [])
    assert variant.run_tests(*METHOD_SUITE) == 0


def test_method_awq_scales_layers_it_can_fold_and_moves_outputs_less(gen_from_text, quantization_spec):
    rtn = gen_from_text(quantization_spec, "igla_quantization").impl
    variant = gen_from_text(with_config(quantization_spec, "method", "awq"), "igla_quantization")
    awq = variant.impl
    assert awq.METHOD == "awq"

    class Block(torch.nn.Module):  # a norm-like per-channel gain, then a projection: AWQ folds into the gain
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.gain = torch.nn.Parameter(torch.ones(256), requires_grad=False)
            self.layers = torch.nn.ModuleList([torch.nn.Linear(256, 128)])

        def forward(self, x):
            return self.layers[0](x * self.gain)

    g = torch.Generator().manual_seed(2)
    x = torch.randn(1024, 256, generator=g)
    x[:, :6] *= 25.0  # salient input channels
    reference = Block()
    expected = reference(x).detach()
    errors, folded = {}, []
    for name, module in (("rtn", rtn), ("awq", awq)):
        model = Block()

        def fold(factor, model=model):
            folded.append(factor.shape)
            model.gain.mul_(factor)

        module.quantize_model(model, [], lambda: model(x), folds={"layers.0": fold})
        errors[name] = (model(x) - expected).norm().item()
    assert folded == [torch.Size([256])]  # AWQ folded once; round to nearest never calls a fold
    assert errors["awq"] < 0.9 * errors["rtn"], errors  # measured: 0.81
    assert variant.run_tests(*METHOD_SUITE) == 0
