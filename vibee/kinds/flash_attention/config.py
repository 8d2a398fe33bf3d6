"""Config of the flash_attention kind: which head dims are compiled in, the tile shapes of the
prefill kernel (and its autotune candidates), how decode splits the KV of a sequence, and how
scores are scaled. Every default lives here; templates read the resolved values."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from vibee.ir.spec import KindConfig, knob

# Head dims the kernels are written for (80 and 96 load a zero-padded 128-wide tile on Triton),
# and the small ones that keep CPU tests fast.
MODEL_HEAD_DIMS = (64, 80, 96, 128, 256)
TEST_HEAD_DIMS = (8, 16, 32)

# tl.dot needs every matrix dimension to be at least 16.
MIN_TILE = 16
MAX_TILE = 256

# The served models' K/V dtype (bf16 or fp16) for the figures of `vibee explain`; the kernels
# take whatever dtype their inputs have.
SERVED_ELEMENT_BYTES = 2


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _tile_side(name: str, value: int) -> int:
    if not is_power_of_two(value) or not MIN_TILE <= value <= MAX_TILE:
        raise ValueError(f"{name} must be a power of two between {MIN_TILE} and {MAX_TILE}, got {value}")
    return value


class TileConfig(BaseModel):
    """One launch configuration of the prefill kernel: a program handles block_m queries and walks
    the KV in tiles of block_n tokens (the page size is the KV cache's, read at run time)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    block_m: StrictInt = Field(128, description="query rows per program (power of two, 16..256)")
    block_n: StrictInt = Field(64, description="KV tokens per inner-loop tile (power of two, 16..256)")
    num_warps: StrictInt = Field(4, description="warps per program on the GPU (power of two, 1..32)")
    num_stages: StrictInt = Field(3, description="software-pipelining stages of the KV loop (1..8)")

    @field_validator("block_m", "block_n")
    @classmethod
    def _block_is_power_of_two(cls, value: int, info) -> int:
        return _tile_side(info.field_name, value)

    @field_validator("num_warps")
    @classmethod
    def _warps_are_power_of_two(cls, value: int) -> int:
        if not is_power_of_two(value) or value > 32:
            raise ValueError(f"num_warps must be a power of two between 1 and 32, got {value}")
        return value

    @field_validator("num_stages")
    @classmethod
    def _stages_in_range(cls, value: int) -> int:
        if not 1 <= value <= 8:
            raise ValueError(f"num_stages must be between 1 and 8, got {value}")
        return value

    def shared_memory_bytes(self, head_dim: int, element_bytes: int) -> int:
        """Rough shared memory of one program: the Q tile plus num_stages buffered K and V tiles."""
        padded = 1 << (head_dim - 1).bit_length()
        return element_bytes * padded * (self.block_m + 2 * self.block_n * self.num_stages)


def _default_autotune() -> list[TileConfig]:
    return [
        TileConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
        TileConfig(block_m=64, block_n=64, num_warps=4, num_stages=4),
        TileConfig(block_m=64, block_n=32, num_warps=4, num_stages=4),
    ]


class PrefillConfig(TileConfig):
    """The prefill kernel: its default tile (block_m, block_n, num_warps, num_stages) and the
    candidates the Triton autotuner times."""

    autotune: list[TileConfig] = Field(
        default_factory=_default_autotune,
        description="launch configurations tried by the autotuner (the torch target checks they all agree)",
    )

    @field_validator("autotune")
    @classmethod
    def _candidates_are_distinct(cls, value: list[TileConfig]) -> list[TileConfig]:
        seen = set()
        for tile in value:
            key = (tile.block_m, tile.block_n, tile.num_warps, tile.num_stages)
            if key in seen:
                raise ValueError(
                    "autotune lists the same candidate twice: "
                    f"{{block_m: {key[0]}, block_n: {key[1]}, num_warps: {key[2]}, num_stages: {key[3]}}}"
                )
            seen.add(key)
        return value


class DecodeConfig(BaseModel):
    """The split-KV decode kernel: the KV of each sequence is cut into splits that run as separate
    programs, each walking its split in tiles of min_block_kv tokens; a log-sum-exp merge joins them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    split_kv: Literal["auto"] | StrictInt = Field(
        "auto",
        description="'auto': one split per min_block_kv tokens, at most max_splits; or a fixed number of splits",
    )
    min_block_kv: StrictInt = Field(32, description="KV tokens per decode tile and the least a split holds (power of two, 16..256)")
    max_splits: StrictInt = Field(16, description="the most splits 'auto' uses for one sequence")

    @field_validator("split_kv", mode="before")
    @classmethod
    def _split_kv_is_auto_or_count(cls, value: Any) -> Any:
        if value == "auto" and isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        raise ValueError(f"split_kv must be 'auto' or an integer >= 1, got {value!r}")

    @field_validator("min_block_kv")
    @classmethod
    def _tile_is_power_of_two(cls, value: int) -> int:
        return _tile_side("min_block_kv", value)

    @field_validator("max_splits")
    @classmethod
    def _max_splits_positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"max_splits must be at least 1, got {value}")
        return value

    def num_splits_for(self, kv_len: int) -> int:
        """Splits for a sequence of kv_len tokens: never more than it has tiles of min_block_kv."""
        tiles = max(1, math.ceil(kv_len / self.min_block_kv))
        wanted = self.max_splits if self.split_kv == "auto" else self.split_kv
        return min(wanted, tiles)


class FlashAttentionConfig(KindConfig):
    """Paged flash attention: varlen prefill (with cached prefixes) and split-KV decode."""

    KIND: ClassVar[str] = "flash_attention"
    BEHAVIORS: ClassVar[dict[str, str]] = {
        "paged_prefill": "new query tokens attend to their sequence's paged KV (full prefill, chunked prefill, prefix-cache hits)",
        "paged_decode": "one query token per sequence attends to its paged KV, split-KV with a log-sum-exp merge",
        "varlen_attention": "variable-length attention over contiguous K/V (the path without a KV cache)",
        "merge_splits": "partial outputs and log-sum-exps of KV splits combine into the softmax over all of the KV",
        "num_splits_for": "how many KV splits decode uses for a sequence of a given length",
    }
    TEST_INPUT_KEYS: ClassVar[frozenset[str]] = frozenset(
        {
            "seq_lens",  # new query tokens per sequence (prefill, varlen)
            "prefix_lens",  # tokens already cached before them (chunked prefill, prefix hits)
            "kv_lens",  # KV length per sequence (decode)
            "heads",  # query heads
            "kv_heads",  # KV heads (GQA when fewer than heads)
            "head_dim",  # one of head_dims (another is rejected: see expected `error`)
            "variants",  # names from the spec's variants: section
            "causal",  # prefill/varlen only; defaults to config.causal
            "window",  # sliding window (the runtime argument): keys less than this far behind a query
            "dtype",  # bf16 | fp16 | fp32 for q/k/v (default fp32)
            "num_splits",  # decode only: force this many KV splits
            "seed",  # random inputs' seed
        }
    )
    TEST_EXPECTED_KEYS: ClassVar[frozenset[str]] = frozenset(
        {
            "max_abs_err",  # max |impl - reference| over the output
            "max_rel_err",  # max |impl - reference| / max |reference|
            "num_splits",  # num_splits_for(the longest kv_len)
            "error",  # the call raises ValueError whose message contains this text
        }
    )

    head_dims: list[StrictInt] = knob("compile",
        default_factory=lambda: [64, 128],
        description="head dims compiled in; each of 64, 80, 96, 128, 256 (or 8, 16, 32 for CPU tests)",
    )
    causal: bool = knob("compile", True, description="queries see only keys at or before their own position")
    softmax_scale: Literal["auto"] | float = knob("compile", "auto", description="'auto' = 1/sqrt(head_dim), or a fixed positive scale")
    prefill: PrefillConfig = knob("compile", default_factory=PrefillConfig, description="prefill kernel tiles and autotune candidates")
    decode: DecodeConfig = knob("compile", default_factory=DecodeConfig, description="split-KV decode policy")

    @field_validator("head_dims")
    @classmethod
    def _head_dims_supported(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("head_dims must list at least one head dim")
        for d in value:
            if d not in MODEL_HEAD_DIMS and d not in TEST_HEAD_DIMS:
                raise ValueError(
                    f"head dim {d} is not supported; expected one of "
                    f"{', '.join(map(str, MODEL_HEAD_DIMS))} (or {', '.join(map(str, TEST_HEAD_DIMS))} for tests)"
                )
        duplicates = sorted({d for d in value if value.count(d) > 1})
        if duplicates:
            raise ValueError(f"head_dims lists {duplicates[0]} more than once")
        return value

    @field_validator("softmax_scale", mode="before")
    @classmethod
    def _scale_is_auto_or_positive(cls, value: Any) -> Any:
        if value == "auto" and isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            return float(value)
        raise ValueError(f"softmax_scale must be 'auto' or a positive number, got {value!r}")

    def scale_for(self, head_dim: int) -> float:
        return 1.0 / math.sqrt(head_dim) if self.softmax_scale == "auto" else float(self.softmax_scale)

    def derived(self, shape=None) -> dict[str, str]:  # shape: the model explain is run for (unused here)
        figures: dict[str, str] = {}
        for d in self.head_dims:
            figures[f"head_dim {d}: softmax scale"] = f"{self.scale_for(d):.6g}"
            figures[f"head_dim {d}: K+V bytes per token per KV head (bf16)"] = str(2 * d * SERVED_ELEMENT_BYTES)
        tiles = [self.prefill, *self.prefill.autotune]
        widest = max(self.head_dims)
        for tile in tiles:
            name = f"prefill tile {tile.block_m}x{tile.block_n} (warps {tile.num_warps}, stages {tile.num_stages})"
            kib = tile.shared_memory_bytes(widest, SERVED_ELEMENT_BYTES) / 1024
            figures[f"{name}: shared memory at head_dim {widest} (bf16)"] = f"{kib:.0f} KiB"
        for kv_len in (128, 1024, 8192, 32768):
            figures[f"decode splits at {kv_len} tokens"] = str(self.decode.num_splits_for(kv_len))
        return figures
