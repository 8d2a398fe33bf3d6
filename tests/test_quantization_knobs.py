"""The quantization spec drives the generated module: change one knob in the shipped spec's text,
regenerate, and the module behaves differently in the way the knob says; bad values are spec
errors at the offending line."""

from __future__ import annotations

import re

import pytest
import torch

from vibee.kinds.quantization.config import QuantizationConfig
from vibee.frontend.errors import SpecError


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
    int8 = gen_from_text(with_config(quantization_spec, "bits", 8), "igla_quantization").impl
    int4 = gen_from_text(with_config(quantization_spec, "bits", 4), "igla_quantization").impl
    w = weight()
    q8, q4 = int8.quantize_weight(w), int4.quantize_weight(w)

    assert (q8.qweight.dtype, tuple(q8.qweight.shape)) == (torch.int8, (16, 256))  # one code per byte
    assert (q4.qweight.dtype, tuple(q4.qweight.shape)) == (torch.int32, (16, 32))  # 8 codes per word
    levels8 = int8.unpack_codes(q8.qweight).unique().numel()
    levels4 = int4.unpack_codes(q4.qweight).unique().numel()
    assert levels4 <= 16 < levels8 <= 256
    assert mean_error(int4, w) > 8 * mean_error(int8, w)


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
    assert asymmetric.run_tests() == 0  # the generated suite, spec cases included, passes for the variant


def test_bits_3_is_an_error_listing_the_allowed_values(gen_from_text, quantization_spec):
    with pytest.raises(SpecError) as caught:
        gen_from_text(with_config(quantization_spec, "bits", 3), "igla_quantization")
    message = caught.value.render()
    assert re.search(r"igla_quantization\.vibee:\d+:\d+: error: bits must be one of 4, 8, got 3", message), message


def test_method_gptq_is_an_error_pointing_to_rtn(gen_from_text, quantization_spec):
    with pytest.raises(SpecError) as caught:
        gen_from_text(with_config(quantization_spec, "method", "gptq"), "igla_quantization")
    message = caught.value.render()
    assert re.search(r"\.vibee:\d+:\d+: error: method 'gptq' is not implemented yet, use rtn", message), message


@pytest.mark.parametrize("value", [100, 16, 2048, 0])
def test_group_size_must_be_a_power_of_two_in_range(value):
    with pytest.raises(ValueError, match=rf"group_size must be a power of two from 32 to 1024, or -1 .*got {value}"):
        QuantizationConfig(group_size=value)


def test_int8_defaults_to_one_group_per_output_channel():
    assert QuantizationConfig().group_size == 128
    assert QuantizationConfig(bits=8).group_size == -1
    assert QuantizationConfig(bits=8, group_size=64).group_size == 64


def test_derived_figures_count_scales_and_zero_points():
    figures = QuantizationConfig().derived()
    assert figures["bits per weight"].startswith("4.125 ")  # 4 + 16-bit scale / 128
    assert figures["compression vs bf16"] == "3.88x"
    asymmetric = QuantizationConfig(symmetric=False, group_size=32).derived()
    assert asymmetric["bits per weight"].startswith("4.750 ")  # 4 + (16 + 8) / 32
    assert QuantizationConfig(bits=8).derived()["compression vs bf16"] == "2.00x"
