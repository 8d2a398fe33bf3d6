"""Config of the quantization kind: how linear weights are turned into low-bit codes and scales,
and the launch tiles of the Triton kernels that multiply by them. Every default lives here; the
templates beside it read the resolved values."""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal, Mapping

from pydantic import field_validator, model_validator

from vibee.ir.spec import KindConfig, knob
from vibee.kinds.quantization.layout import quantized_weight_bytes
from vibee.kinds.quantization.tiles import FP8_TRITON_MAX_ROWS, Fp8Tile, MatmulTile, measured_fp8_tiles, measured_tiles

BITS_ALLOWED = (4, 8)
MIN_GROUP_SIZE = 32
MAX_GROUP_SIZE = 1024
PER_CHANNEL = -1

# Bytes of one scale, by compute dtype (scales are stored in the compute dtype).
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Zero points (asymmetric only) are stored as one uint8 per group.
ZERO_POINT_BYTES = 1
# Words 4-bit codes are packed into, by pack_format: how many codes one word holds.
CODES_PER_WORD = {"int32": 8, "uint8": 2}
METHOD_NAMES = {"rtn": "round to nearest", "gptq": "GPTQ over calibration text", "awq": "AWQ over calibration text"}
# The example weight `vibee explain` sizes: [out, in] of Llama-3-8B's MLP down projection.
EXAMPLE_SHAPE = (4096, 14336)

_MODULE_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


class QuantizationConfig(KindConfig):
    KIND: ClassVar[str] = "quantization"
    MIN_GROUP_SIZE: ClassVar[int] = MIN_GROUP_SIZE  # a row group_size does not divide halves it down to this
    BEHAVIORS: ClassVar[dict[str, str]] = {
        "quantize_weight": "quantize_weight: round-to-nearest codes, scales (and zero points) per group of a [out, in] weight",
        "pack_int4": "pack_int4: 4-bit codes packed little-endian into words along the input dimension",
        "unpack_int4": "unpack_int4: the exact inverse of pack_int4",
        "dequantize": "dequantize: (code - zero) * scale back to a dense weight in the compute dtype",
        "quant_linear": "QuantLinear: nn.Linear's call signature over a quantized weight",
        "quantize_model": "quantize_model: swap a model's nn.Linear layers for QuantLinear, except skip_modules",
        "weight_bytes": "weight_bytes: bytes a model's parameters and buffers occupy",
    }
    # What a spec test case may say; templates/test.py.j2 gives each key its meaning.
    TEST_INPUT_KEYS: ClassVar[frozenset[str]] = frozenset(
        {
            "out_features",  # the weight is [out_features, in_features] (for a model case: lm_head's vocab)
            "in_features",  # (for a model case: the hidden size)
            "batch",  # rows of the activation fed through QuantLinear
            "bias",  # whether the linear layer has a bias
            "distribution",  # weights drawn as "normal", "positive" (uniform 0..1), "outliers" or "zeros"
            "seed",
            "num_layers",  # model case: blocks of up/down projections before an lm_head
        }
    )
    TEST_EXPECTED_KEYS: ClassVar[frozenset[str]] = frozenset(
        {
            "max_abs_err",  # max |w - dequantize(quantize(w))| / (max(w) - min(w)) must not exceed this
            "max_rel_err",  # max |QuantLinear(x) - reference output| / max |reference output|
            "snr_db_min",  # 10 log10(|y|^2 / |y - QuantLinear(x)|^2) against the float linear y
            "min_compression",  # bf16 bytes of the weight / bytes of qweight + scales + zeros
            "layers_quantized",  # model case: nn.Linear layers quantize_model replaced
            "layers_skipped",  # model case: nn.Linear layers it left alone (skip_modules)
            "raises",  # name of the exception quantize_weight must raise for this shape, e.g. ValueError
            "group_size",  # the group a row of in_features weights takes (group_size, or a smaller power of two)
        }
    )

    bits: int = knob("compile", 4, strict=True, description="Bits per weight code: 4 (codes packed into words) or 8 (one int8/uint8 per code).")
    group_size: int = knob("compile",
        128,
        strict=True,
        flag="--group-size",
        description=(
            "Input-dimension weights sharing one scale: a power of two from 32 to 1024, or -1 for one group per"
            " output channel. When not given, 8-bit configs default to -1 (per channel) and 4-bit ones to 128."
            " A layer whose width it does not divide takes the largest smaller power of two that does, down to 32."
        ),
    )
    code_type: Literal["int", "fp8"] = knob("compile",
        "int",
        description=(
            "What a code is: 'int', an integer of `bits` bits with a scale per group (and, asymmetric, a zero point);"
            " 'fp8', a float8 e4m3 value (bits 8, symmetric, one scale per output channel, method rtn) whose"
            " QuantLinear also rounds its input to fp8 per row on GPUs with fp8 tensor cores (W8A8; elsewhere the"
            " weight alone is fp8)."
        ),
    )
    symmetric: bool = knob("compile",
        True,
        strict=True,
        description=(
            "Symmetric: codes in [-2^(b-1), 2^(b-1)-1], scale = absmax / (2^(b-1)-1), no zero point."
            " Asymmetric: codes in [0, 2^b-1] with a uint8 zero point per group, over the group's range widened to include 0."
        ),
    )
    pack_format: Literal["int32", "uint8"] = knob("compile",
        "int32",
        description=(
            "Word that 4-bit codes are packed into along the input dimension, little-endian (code k of a word in bits"
            " 4k..4k+3), stored offset to unsigned: 'int32' (8 codes per word) or 'uint8' (2). 8-bit codes are not packed."
        ),
    )
    compute_dtype: Literal["bf16", "fp16", "fp32"] = knob("compile",
        "bf16", description="Dtype of scales, of the dequantized weight and of the QuantLinear matmul."
    )
    tiles: list[MatmulTile] = knob("compile",
        default_factory=measured_tiles,
        description=(
            "Launch tiles of the Triton kernels, by activation rows M and weight rows N: the first row whose max_m"
            " (none: any) is >= M and whose min_n is <= N (and whose gpu, if any, is in the device's name). The last"
            " row must cover every product (no max_m, min_n 0, no gpu)."
        ),
    )
    fp8_tiles: list[Fp8Tile] = knob("compile",
        default_factory=measured_fp8_tiles,
        description=(
            "code_type fp8: launch tiles of the W8A8 Triton kernel by activation rows M: the first row whose max_m"
            " (none: any) is >= M. max_m grows down the table and the last row has none."
        ),
    )
    fp8_triton_max_rows: int = knob("compile",
        FP8_TRITON_MAX_ROWS,
        ge=0,
        le=4096,
        description=(
            "code_type fp8: up to this many activation rows the Triton kernel runs even where cuBLASLt's fp8 GEMM"
            " could (bf16 on a GPU whose torch has it); more rows take cuBLASLt, but where the Triton kernel splits"
            " k 4 ways or more (a narrow weight) and has at most 16 rows a split."
        ),
    )
    method: Literal["rtn", "gptq", "awq"] = knob("compile",
        "rtn",
        flag="--quant-method",
        description=(
            "How codes are chosen: 'rtn' rounds each weight to its nearest code; 'gptq' (GPTQ) picks them one input"
            " column at a time over calibration text, spreading each column's rounding error over the columns after it;"
            " 'awq' (AWQ) scales up the weights of the input channels with large activations before rounding (folding"
            " the inverse into the norm or projection before), at the scale that moves the outputs least on calibration text."
        ),
    )
    damp_percent: float = knob("compile",
        0.01,
        gt=0,
        le=1,
        description="GPTQ: this fraction of the mean diagonal of a layer's input Hessian is added to its diagonal.",
    )
    act_order: bool = knob("compile",
        True,
        description=(
            "GPTQ: quantize a layer's input columns largest Hessian diagonal first (the inputs with the largest"
            " activations, while the most columns are left to take up their error), every group's scale from the"
            " weights before any update; false: in input order, a group's scale when GPTQ reaches it."
        ),
    )
    calibration_samples: int = knob("runtime",
        128,
        ge=1,
        description="GPTQ and AWQ: sequences of calibration text the model runs (the Python standard library's source, outside the built-in model's held-out files).",
    )
    calibration_seq_len: int = knob("runtime",
        512,
        ge=16,
        description="GPTQ and AWQ: tokens per calibration sequence (at most the model's context).",
    )
    skip_modules: list[str] = knob("runtime",
        default_factory=lambda: ["lm_head"],
        description="Linear layers quantize_model leaves in full precision: a name matches a module whose dotted name is it or ends with '.' + it.",
    )

    @model_validator(mode="before")
    @classmethod
    def _int8_defaults_to_per_channel(cls, data: Any) -> Any:
        # int8 has enough levels that one scale per output channel loses little; int4 needs groups.
        if isinstance(data, dict) and data.get("bits") == 8 and "group_size" not in data:
            return {**data, "group_size": PER_CHANNEL}
        return data

    @model_validator(mode="after")
    def _fp8_is_one_format(self) -> QuantizationConfig:
        if self.code_type == "fp8":
            wanted = {"bits": 8, "group_size": PER_CHANNEL, "symmetric": True, "method": "rtn"}
            wrong = {k: getattr(self, k) for k, v in wanted.items() if getattr(self, k) != v}
            if wrong:
                got = ", ".join(f"{k} {v!r}" for k, v in wrong.items())
                raise ValueError("code_type fp8 takes bits 8, group_size -1 (one scale per output channel), symmetric"
                                 f" true and method rtn; got {got}")
        return self

    def with_overrides(self, overrides: Mapping[str, Any]) -> QuantizationConfig:
        """This config with some knobs set anew (a serve flag: --quant int8 is {"bits": 8}),
        validated. group_size follows bits: when bits is overridden without it, it goes back to
        the default for the new bits (int8: per channel), whatever the spec wrote for its own bits."""
        values = self.model_dump()
        if "bits" in overrides and "group_size" not in overrides:
            del values["group_size"]
        if overrides.get("code_type") == "fp8":  # --quant fp8: one format, whatever the spec's integer codes were
            values.update(symmetric=True, method="rtn")
        return type(self).model_validate({**values, **overrides})

    @field_validator("bits")
    @classmethod
    def _bits_supported(cls, value: int) -> int:
        if value not in BITS_ALLOWED:
            raise ValueError(f"bits must be one of {', '.join(map(str, BITS_ALLOWED))}, got {value}")
        return value

    @field_validator("group_size")
    @classmethod
    def _group_size_power_of_two(cls, value: int) -> int:
        if value == PER_CHANNEL:
            return value
        is_power_of_two = value > 0 and value & (value - 1) == 0
        if not (is_power_of_two and MIN_GROUP_SIZE <= value <= MAX_GROUP_SIZE):
            raise ValueError(
                f"group_size must be a power of two from {MIN_GROUP_SIZE} to {MAX_GROUP_SIZE}, "
                f"or -1 for one group per output channel, got {value}"
            )
        return value

    @field_validator("tiles")
    @classmethod
    def _tiles_cover_every_product_once(cls, value: list[MatmulTile]) -> list[MatmulTile]:
        if not value or value[-1].max_m is not None or value[-1].min_n != 0 or value[-1].gpu is not None:
            raise ValueError("the last row of tiles must cover every product: no max_m, min_n 0 and no gpu")
        for i, later in enumerate(value):
            for j, earlier in enumerate(value[:i]):
                if earlier.covers(later):
                    raise ValueError(f"tiles[{i}] is never used: tiles[{j}] comes first and matches every product it would")
        return value

    @field_validator("fp8_tiles")
    @classmethod
    def _fp8_tiles_grow_and_cover_every_product(cls, value: list[Fp8Tile]) -> list[Fp8Tile]:
        if not value or value[-1].max_m is not None:
            raise ValueError("the last row of fp8_tiles must cover every product: no max_m")
        bounds = [t.max_m for t in value[:-1]]
        if None in bounds:
            i = bounds.index(None)
            raise ValueError(f"fp8_tiles[{i + 1}:] are never used: fp8_tiles[{i}] has no max_m, so it takes every product;"
                             " give it a max_m or move it last")
        for i, (earlier, later) in enumerate(zip(bounds, bounds[1:]), start=1):
            if later <= earlier:
                raise ValueError(f"fp8_tiles[{i}] is never used: its max_m {later} is not above fp8_tiles[{i - 1}]'s {earlier}")
        return value

    @field_validator("skip_modules")
    @classmethod
    def _skip_modules_are_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _MODULE_NAME.match(name):
                raise ValueError(f"skip_modules entries are module names like 'lm_head' or 'layers.0.mlp', got {name!r}")
        return value

    # --- figures for `vibee explain` ---------------------------------------------------------

    def group_size_for(self, in_features: int) -> int:
        """The generated group_size_for: group_size, halved while it does not divide the row (to 32)."""
        if self.group_size == PER_CHANNEL:
            return in_features
        group = self.group_size
        while in_features % group and group > MIN_GROUP_SIZE:
            group //= 2
        return group

    def weight_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes of the quantized weight: codes, scales and (asymmetric) zero points."""
        return quantized_weight_bytes(out_features, in_features, bits=self.bits, group_size=self.group_size,
                                      scale_bytes=DTYPE_BYTES[self.compute_dtype],
                                      zero_point_bytes=0 if self.symmetric else ZERO_POINT_BYTES)

    def bits_per_weight(self, in_features: int) -> float:
        out_features = 1
        return 8 * self.weight_bytes(out_features, in_features) / in_features

    def derived(self, shape=None) -> dict[str, str]:  # shape: the model explain is run for (unused here)
        out_f, in_f = EXAMPLE_SHAPE
        group = self.group_size_for(in_f)
        bpw = self.bits_per_weight(in_f)
        bf16 = out_f * in_f * 2
        quantized = self.weight_bytes(out_f, in_f)
        if self.code_type == "fp8":
            layout = "float8_e4m3fn of shape (out, in): one e4m3 value per byte"
        elif self.bits == 4:
            per_word = CODES_PER_WORD[self.pack_format]
            layout = f"{self.pack_format} words of shape (out, in/{per_word}): {per_word} codes each, little-endian along in"
        else:
            layout = f"{'int8' if self.symmetric else 'uint8'} of shape (out, in): one code per byte"
        return {
            "codes": ("fp8 e4m3, W8A8 on fp8 tensor cores" if self.code_type == "fp8" else
                      f"int{self.bits} {'symmetric' if self.symmetric else 'asymmetric (uint8 zero points)'}, {METHOD_NAMES[self.method]}"),
            **({"calibration": f"{self.calibration_samples} x {self.calibration_seq_len} tokens of stdlib source"
                               + (f", damp {self.damp_percent}{', act order' if self.act_order else ''}" if self.method == "gptq" else "")}
               if self.method != "rtn" else {}),
            "groups": "one per output channel" if self.group_size == PER_CHANNEL else f"{self.group_size} input weights per scale",
            "qweight layout": layout,
            "bits per weight": f"{bpw:.3f} (codes {self.bits} + scales/zeros {bpw - self.bits:.3f}, group {group})",
            "compression vs bf16": f"{16 / bpw:.2f}x",
            f"weight {out_f}x{in_f} (Llama-3-8B down_proj)": f"{quantized / 2**20:.1f} MiB (bf16: {bf16 / 2**20:.1f} MiB)",
            **({f"fp8 tile for M {_rows(t.max_m)}": t.summary() for t in self.fp8_tiles}
               | {"fp8 Triton kernel": f"up to {self.fp8_triton_max_rows} rows (more: cuBLASLt, but narrow weights)"}
               if self.code_type == "fp8" else
               {f"tile for M {_rows(t.max_m)}, N >= {t.min_n}": t.summary() for t in self.tiles}),
        }


def _rows(max_m: int | None) -> str:
    return "any" if max_m is None else f"<= {max_m}"
