"""Config of the decoder kind: the launches of the decoder layer's own kernels (add + RMSNorm, RoPE
on q and k, SiLU * up, and the one-token GEMV of unquantized weights, with SiLU * up or RoPE in its
epilogue for the gate_up and QKV projections).
Every default lives here; the templates beside it read the resolved tables. All knobs are
compile-time: they are constexprs and launch arguments of the generated launchers."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from vibee.ir.spec import KindConfig, knob

MAX_WARPS, MAX_STAGES = 32, 8
MIN_BLOCK_N, MAX_BLOCK_N = 1, 128
MIN_BLOCK_K, MAX_BLOCK_K = 16, 4096
MAX_TILE_ELEMENTS = 32768  # a GEMV program's [block_n, block_k] float32 partial sums live in registers
MIN_SILU_BLOCK, MAX_SILU_BLOCK = 16, 8192


def _power_of_two(name: str, value: int, low: int, high: int) -> int:
    if not (value > 0 and value & (value - 1) == 0 and low <= value <= high):
        raise ValueError(f"{name} must be a power of two from {low} to {high}, got {value}")
    return value


def _positive_or_none(name: str):
    def check(value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1 (or left out: any), got {value}")
        return value
    return check


def _stages(value: int) -> int:
    if not 1 <= value <= MAX_STAGES:
        raise ValueError(f"num_stages must be from 1 to {MAX_STAGES}, got {value}")
    return value


Warps = Annotated[StrictInt, AfterValidator(lambda v: _power_of_two("num_warps", v, 1, MAX_WARPS))]


class GemvTile(BaseModel):
    """One row of the one-token GEMV's launch table: y [N] = W [N, K] @ x [K] takes the first row
    with N <= max_n (none: any N) and K >= min_k."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_n: Annotated[StrictInt | None, AfterValidator(_positive_or_none("max_n"))] = Field(
        None, description="the most weight output rows this row covers; none: any number")
    min_k: StrictInt = Field(0, description="the fewest inputs (weight columns) this row covers")
    block_n: Annotated[StrictInt, AfterValidator(lambda v: _power_of_two("block_n", v, MIN_BLOCK_N, MAX_BLOCK_N))] = Field(
        description="weight output rows per program (a power of two, 1..128)")
    block_k: Annotated[StrictInt, AfterValidator(lambda v: _power_of_two("block_k", v, MIN_BLOCK_K, MAX_BLOCK_K))] = Field(
        512, description="inputs per step of the k loop (a power of two, 16..4096)")
    num_warps: Warps = Field(4, description="warps per program (a power of two, 1..32)")
    num_stages: Annotated[StrictInt, AfterValidator(_stages)] = Field(3, description="software-pipelining stages of the k loop (1..8)")

    @field_validator("min_k")
    @classmethod
    def _min_k_not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"min_k must be 0 or more, got {value}")
        return value

    def covers(self, other: GemvTile) -> bool:
        """Every product `other` would take is taken by this row (so a later `other` is never used)."""
        wider = self.max_n is None or (other.max_n is not None and other.max_n <= self.max_n)
        return wider and self.min_k <= other.min_k

    def summary(self) -> str:
        return (f"{self.block_n} row{'s' * (self.block_n != 1)} x {self.block_k} inputs, {self.num_warps} warps, "
                f"{self.num_stages} stage{'s' * (self.num_stages != 1)}")


class NormWarps(BaseModel):
    """One row of add + RMSNorm's launch table: a row of the hidden state `width` wide (one program
    per row, the whole row in one block) takes the first row with width <= max_width (none: any)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_width: Annotated[StrictInt | None, AfterValidator(_positive_or_none("max_width"))] = Field(
        None, description="the widest hidden state this row covers; none: any width")
    num_warps: Warps = Field(description="warps per program (a power of two, 1..32)")


class RopeWarps(BaseModel):
    """One row of RoPE's launch table (one program a token): a step whose q has heads x head_dim / 2
    rotation pairs takes the first row with pairs >= min_pairs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_pairs: StrictInt = Field(0, description="the fewest (head, pair) rotations of q a token this row covers")
    num_warps: Warps = Field(description="warps per program (a power of two, 1..32)")

    @field_validator("min_pairs")
    @classmethod
    def _min_pairs_not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"min_pairs must be 0 or more, got {value}")
        return value


def _check_bounded_rows(table: str, bounds: list[int | None], key: str, what: str, grows: bool) -> None:
    """A table whose rows each take what is within their bound (None: everything), first match
    first: every bound but the last is set and each is past the one before (above it when the
    bounds are maxima, `grows`; below it when they are minima), and the last row takes the rest."""
    if not bounds:
        raise ValueError(f"{table} needs at least one row")
    for i, bound in enumerate(bounds[:-1]):
        if bound is None:
            raise ValueError(f"{table}[{i + 1}:] are never used: {table}[{i}] has no {key}, so it takes every {what}")
        later = bounds[i + 1]
        if later is not None and (later <= bound if grows else later >= bound):
            side = "above" if grows else "below"
            raise ValueError(f"{table}[{i + 1}] is never used: its {key} {later} is not {side} {table}[{i}]'s {bound}")
    if bounds[-1] is not None:
        raise ValueError(f"the last row of {table} must cover every {what}: no {key}")


def measured_gemv_tiles() -> list[GemvTile]:
    """`vibee bench tiles --quant none` on an H100 at Llama-3.2-1B's weights (2026-12-07): each row
    the fastest launch at its weight (the down projection's 2048 x 8192, o_proj's 2048 x 2048,
    qkv's 3072 x 2048, gate_up's 16384 x 2048, then lm_head's for the rest)."""
    return [GemvTile(max_n=2048, min_k=8192, block_n=1, block_k=512, num_stages=1),
            GemvTile(max_n=2048, min_k=2048, block_n=2, block_k=1024, num_stages=1),
            GemvTile(max_n=3072, min_k=2048, block_n=2, block_k=1024),
            GemvTile(max_n=16384, min_k=2048, block_n=1, block_k=1024),
            GemvTile(block_n=2, block_k=1024, num_stages=1)]


def measured_norm_warps() -> list[NormWarps]:
    return [NormWarps(max_width=512, num_warps=1), NormWarps(max_width=4096, num_warps=4), NormWarps(num_warps=8)]


def measured_rope_warps() -> list[RopeWarps]:
    return [RopeWarps(min_pairs=1024, num_warps=4), RopeWarps(num_warps=1)]


class DecoderConfig(KindConfig):
    KIND: ClassVar[str] = "decoder"
    BEHAVIORS: ClassVar[dict[str, str]] = {
        "rms_norm": "rms_norm: the residual add and RMSNorm of a layer's input in one pass, (normalised, new residual)",
        "apply_rope_qk": "apply_rope_qk: q and k rotated by their positions (rotate-half), on a GPU also storing k and v in the KV pages",
        "silu_mul": "silu_mul: silu(gate) * up of the MLP, rounded as the torch expression rounds it",
        "linear": "linear: F.linear, a one-token step on a GPU through the spec's GEMV",
        "linear_silu_mul": "linear_silu_mul: a merged gate_up projection and silu(gate) * up, the GEMV multiplying them in its epilogue",
    }
    # What a spec test case may say; templates/test.py.j2 gives each key its meaning.
    TEST_INPUT_KEYS: ClassVar[frozenset[str]] = frozenset(
        {
            "rows",  # tokens (rows of x); linear cases on the GEMV take 1
            "heads",  # apply_rope_qk: query heads (default 4)
            "kv_heads",  # apply_rope_qk: key heads (default 2)
            "head_dim",  # apply_rope_qk (default 16)
            "width",  # the hidden size (rms_norm), the MLP's inner size (silu_mul), a linear layer's inputs
            "out_features",  # linear cases: the weight's output rows
            "residual",  # rms_norm: add a residual first (default true)
            "bias",  # linear cases: the layer has a bias (default false)
            "dtype",  # "fp32", "fp16" or "bf16" (the kernels run in the interpreter in fp32 and fp16 only)
            "seed",
        }
    )
    TEST_EXPECTED_KEYS: ClassVar[frozenset[str]] = frozenset(
        {
            "max_rel_err",  # max |op - float64 reference| / max |reference|, for the torch path and the kernel
        }
    )

    rms_norm_warps: list[NormWarps] = knob("compile", default_factory=measured_norm_warps,
        description="Warps of the add + RMSNorm kernel by hidden-state width: the first row with width <= max_width; the last row has no max_width.")
    rope_warps: list[RopeWarps] = knob("compile", default_factory=measured_rope_warps,
        description="Warps of RoPE's kernel by q's rotation pairs a token (heads x head_dim / 2): the first row with pairs >= min_pairs; the last row has no min_pairs.")
    silu_mul_block: int = knob("compile", 1024, strict=True,
        description="Elements of a row per program of the SiLU * up kernel (a power of two, 16..8192).")
    one_token_gemv: StrictBool = knob("compile", True,
        description=("A one-token step of an unquantized linear layer on a GPU runs the spec's GEMV (false: cuBLAS through"
                     " F.linear, and silu(gate) * up its own kernel before the down projection)."))
    gemv_tiles: list[GemvTile] = knob("compile", default_factory=measured_gemv_tiles,
        description="Launch tiles of the one-token GEMV: the first row with N <= max_n and K >= min_k; the last row covers every product.")

    @field_validator("silu_mul_block")
    @classmethod
    def _silu_block(cls, value: int) -> int:
        return _power_of_two("silu_mul_block", value, MIN_SILU_BLOCK, MAX_SILU_BLOCK)

    @field_validator("gemv_tiles")
    @classmethod
    def _gemv_tiles_cover_every_product(cls, value: list[GemvTile]) -> list[GemvTile]:
        if not value:
            raise ValueError("gemv_tiles needs at least one row")
        for i, tile in enumerate(value):
            if tile.block_n * tile.block_k > MAX_TILE_ELEMENTS:
                raise ValueError(f"gemv_tiles[{i}]: block_n x block_k is {tile.block_n * tile.block_k} partial sums a program,"
                                 f" over {MAX_TILE_ELEMENTS}")
            for j, earlier in enumerate(value[:i]):
                if earlier.covers(tile):
                    raise ValueError(f"gemv_tiles[{i}] is never used: gemv_tiles[{j}] takes every product it would")
        last = value[-1]
        if last.max_n is not None or last.min_k:
            raise ValueError("the last row of gemv_tiles must cover every product: no max_n and no min_k")
        return value

    @field_validator("rms_norm_warps")
    @classmethod
    def _norm_rows_grow(cls, value: list[NormWarps]) -> list[NormWarps]:
        _check_bounded_rows("rms_norm_warps", [row.max_width for row in value], "max_width", "width", grows=True)
        return value

    @field_validator("rope_warps")
    @classmethod
    def _rope_rows_shrink(cls, value: list[RopeWarps]) -> list[RopeWarps]:
        _check_bounded_rows("rope_warps", [row.min_pairs or None for row in value], "min_pairs", "step", grows=False)
        return value

    def derived(self, shape) -> dict[str, str]:
        """The launches a model shape's one-token step makes."""
        width = shape.hidden_size
        norm = next(r for r in self.rms_norm_warps if r.max_width is None or width <= r.max_width)
        q_out, kv_out = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
        products = {"qkv_proj": (q_out + 2 * kv_out, width), "o_proj": (width, q_out),
                    "gate_up_proj": (2 * shape.intermediate_size, width), "down_proj": (width, shape.intermediate_size),
                    "lm_head": (shape.vocab_size, width)}
        pairs = shape.num_heads * shape.head_dim // 2
        rope = next(r for r in self.rope_warps if pairs >= r.min_pairs)
        rope_kernel = f"{rope.num_warps} warps a token ({pairs} rotation pairs of q)"
        if self.one_token_gemv:  # the qkv GEMV rotates and stores K/V itself where the cache's store is fused
            qkv = self.gemv_tile(*products["qkv_proj"])
            pairs = max(qkv.block_n // 2, 1)
            rope_kernel = (f"in the qkv_proj GEMV's epilogue ({pairs} rotation pair{'s' * (pairs != 1)} a program) where "
                           f"the KV cache's store is fused; its own kernel otherwise: {rope_kernel}")
        figures = {"rms_norm": f"{norm.num_warps} warps a row of {width}", "rope": rope_kernel}
        for name, (n, k) in products.items():
            tile = self.gemv_tile(n, k)
            figures[f"gemv {name} ({n} x {k})"] = tile.summary() if self.one_token_gemv else "F.linear (one_token_gemv: false)"
        return figures

    def gemv_tile(self, n: int, k: int) -> GemvTile:
        return next(t for t in self.gemv_tiles if (t.max_n is None or n <= t.max_n) and k >= t.min_k)
