"""The launch tiles of the quantization kind's Triton kernels, as the spec writes them (config
`tiles`): a table of rows by activation rows M and weight rows N, and the measured defaults.
launch.py reads the same rows (as LaunchTile) in the generated module. The fp8 kernel's table
(config `fp8_tiles`, by M only) is Fp8Tile's; fp8_kernels.py reads its rows as tuples."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationInfo, field_validator, model_validator

# Launch tiles: tl.dot needs 16 in every dimension; a k tile is whole 32-bit words of 8-bit codes
# (and launch.py never shrinks it below 32).
MIN_TILE, MAX_TILE = 16, 256
MIN_BLOCK_K, MAX_BLOCK_K = 32, 512
MAX_WARPS, MAX_STAGES, MAX_PROGRAMS_PER_SM = 32, 8, 64


def _power_of_two(name: str, value: int, low: int, high: int) -> int:
    if not (value > 0 and value & (value - 1) == 0 and low <= value <= high):
        raise ValueError(f"{name} must be a power of two from {low} to {high}, got {value}")
    return value


def _max_m_positive(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise ValueError(f"max_m must be at least 1 (or left out: any M), got {value}")
    return value


def _stages_in_range(value: int) -> int:
    if not 1 <= value <= MAX_STAGES:
        raise ValueError(f"num_stages must be from 1 to {MAX_STAGES}, got {value}")
    return value


# The fields both tile tables have, with their checks.
MaxRows = Annotated[StrictInt | None, AfterValidator(_max_m_positive)]
Warps = Annotated[StrictInt, AfterValidator(lambda value: _power_of_two("num_warps", value, 1, MAX_WARPS))]
Stages = Annotated[StrictInt, AfterValidator(_stages_in_range)]


class MatmulTile(BaseModel):
    """One row of the kernels' tile table: the launch for products whose activation has at most
    max_m rows (none: any) and whose weight at least min_n output rows. The first matching row wins."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kernel: Literal["gemv", "mm", "slices", "wgmma", "dense"] = Field(
        description="'gemv': one activation row, fp32 FMAs; 'mm': dequantize a tile and tl.dot; 'slices': 4-bit codes in"
                    " 16-bit compute, tl.dot per code position (other formats take 'mm'); 'wgmma': 4-bit codes on"
                    " Hopper, brought by TMA by a loader warp, each warpgroup (num_warps / 4) unpacking its block_n / that many"
                    " rows while its previous tile's async wgmma runs (elsewhere 'mm'); 'dense': dequantize"
                    " the whole weight (block_n x block_k tiles), then torch.matmul")
    max_m: MaxRows = Field(None, description="the most activation rows this row covers; none: any number")
    min_n: StrictInt = Field(0, description="the fewest weight output rows this row covers")
    block_m: StrictInt = Field(1, description="activation rows per program (gemv: 1; mm: a power of two, 16..256)")
    block_n: StrictInt = Field(description="weight output rows per program (power of two, 16..256)")
    min_block_n: StrictInt = Field(description="block_n halves down to this while the grid has fewer programs than SMs (default: block_n)")
    block_k: StrictInt = Field(description="codes along the input per step (power of two, 32..512), halved until it divides the row")
    num_warps: Warps = Field(4, description="warps per program (power of two, 1..32)")
    num_stages: Stages = Field(3, description="software-pipelining stages of the k loop (1..8)")
    programs_per_sm: StrictInt = Field(0, description="split-K brings the grid near this many programs per SM (0..64); 0: no split")
    swap_ab: StrictBool = Field(False, description="'mm': computed as y.T = w @ x.T, the dequantized weight tile as"
                                                   " tl.dot's first operand (rows of x fill only the MMA's N)")
    join_codes: StrictBool = Field(False, description="'mm' and 'dense': codes unpacked in input order by joining the"
                                                      " code positions (else one 3-D shift and a reshape)")
    gpu: str | None = Field(None, description="this row is for GPUs whose name (torch.cuda.get_device_name) contains"
                                              " this, e.g. 'H200' (bench tiles --gpu-rows writes such rows); none: any device")

    @model_validator(mode="before")
    @classmethod
    def _min_block_n_defaults_to_block_n(cls, data: Any) -> Any:
        if isinstance(data, dict) and "min_block_n" not in data and "block_n" in data:
            return {**data, "min_block_n": data["block_n"]}
        return data

    @field_validator("min_n", "programs_per_sm")
    @classmethod
    def _count_in_range(cls, value: int, info: ValidationInfo) -> int:
        high = MAX_PROGRAMS_PER_SM if info.field_name == "programs_per_sm" else 2**31
        if not 0 <= value <= high:
            raise ValueError(f"{info.field_name} must be from 0 to {high}, got {value}")
        return value

    @field_validator("gpu")
    @classmethod
    def _gpu_is_a_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}", value):
            raise ValueError(f"gpu must be part of a GPU's name (letters, digits, spaces, '.', '_', '-'), got {value!r}")
        return value

    @field_validator("block_m")
    @classmethod
    def _block_m_fits_the_kernel(cls, value: int, info: ValidationInfo) -> int:
        if info.data.get("kernel") in ("gemv", "dense"):
            if value != 1:
                raise ValueError(f"a {info.data['kernel']} tile has no rows of its own: block_m must be 1 (or left out), got {value}")
            return value
        return _power_of_two("block_m", value, MIN_TILE, MAX_TILE)

    @field_validator("block_n", "min_block_n")
    @classmethod
    def _block_n_power_of_two(cls, value: int, info: ValidationInfo) -> int:
        if info.field_name == "min_block_n" and "block_n" not in info.data:
            return value  # block_n is wrong (and reported); min_block_n defaults to a copy of it
        return _power_of_two(info.field_name, value, MIN_TILE, MAX_TILE)

    @field_validator("block_k")
    @classmethod
    def _block_k_power_of_two(cls, value: int) -> int:
        return _power_of_two("block_k", value, MIN_BLOCK_K, MAX_BLOCK_K)

    @model_validator(mode="after")
    def _rows_fit_the_kernel(self) -> MatmulTile:
        if self.kernel == "gemv" and self.max_m != 1:
            raise ValueError(f"a gemv tile takes one activation row: max_m must be 1, got {self.max_m}")
        if self.min_block_n > self.block_n:
            raise ValueError(f"min_block_n {self.min_block_n} is wider than block_n {self.block_n}")
        if self.swap_ab and self.kernel != "mm":
            raise ValueError(f"swap_ab is the mm kernel's: a {self.kernel} tile has no operands to swap")
        if self.join_codes and self.kernel not in ("mm", "dense"):
            raise ValueError(f"join_codes is the mm and dense kernels': a {self.kernel} tile unpacks codes its own way")
        if self.kernel == "wgmma":
            self._fits_wgmma()
        return self

    def _fits_wgmma(self) -> None:
        """A warpgroup (4 warps) takes 64 weight rows per wgmma and its fp32 accumulators live in registers."""
        if self.num_warps not in (4, 8):
            raise ValueError(f"a wgmma tile runs on one or two warpgroups: num_warps must be 4 or 8, got {self.num_warps}")
        rows = 16 * self.num_warps
        if self.min_block_n % rows:
            raise ValueError(f"a wgmma tile on {self.num_warps} warps takes weight rows {rows} at a time: block_n and "
                             f"min_block_n must be multiples of {rows}, got {self.block_n} and {self.min_block_n}")
        if self.block_k not in (64, 128):
            raise ValueError(f"a wgmma tile takes block_k 64 or 128 (8- or 16-word rows of codes, x's tile in 128-byte "
                             f"TMA boxes), got {self.block_k}")
        per_thread = self.block_m * self.block_n // (32 * self.num_warps)
        if per_thread > 128:
            raise ValueError(f"a {self.block_m}x{self.block_n} wgmma tile on {self.num_warps} warps keeps {per_thread} fp32 "
                             "accumulators per thread: at most 128 fit in registers (fewer rows or more warps)")

    def covers(self, other: MatmulTile) -> bool:
        """Whether every product other matches is matched by self too."""
        return ((self.gpu is None or self.gpu == other.gpu) and self.min_n <= other.min_n
                and (self.max_m is None or other.max_m is not None and other.max_m <= self.max_m))

    def summary(self) -> str:
        split = f", split-K to {self.programs_per_sm} programs/SM" if self.programs_per_sm else ""
        narrow = f" (down to {self.min_block_n} wide)" if self.min_block_n < self.block_n else ""
        flags = "".join(f", {name}" for name in ("swap_ab", "join_codes") if getattr(self, name))
        gpu = f" (on {self.gpu})" if self.gpu else ""
        return (f"{self.kernel} {self.block_m}x{self.block_n}x{self.block_k}{narrow}, "
                f"{self.num_warps} warps, {self.num_stages} stages{split}{flags}{gpu}")


def measured_tiles() -> list[MatmulTile]:
    """H100 sweeps at Llama-3.2-1B's projections and the 8B's MLP (weights cold in L2, CUDA
    graphs). GEMV: tiles of one group (128 codes, one scale per row), 3 stages and about 8
    programs per SM were within 7% of the best at every projection; from 16,384 rows (gate_up,
    lm_head) 128-row tiles on 8 warps. 2..16 rows: the slices kernel (0.6-0.8x mm's time). Up to
    128 rows: mm tiles split over k (2048 x 8192 at 256 rows: 123 -> 47 us), the weight as tl.dot's
    first operand with codes joined in order (H200: that family's best tile beat the 3-D unpacking's
    pick by 1.3-2.1x at 64 and 128 rows at all five shapes swept). More: dequantize,
    then cuBLAS (2.1-2.4x mm at 2048 rows), except a vocabulary-sized lm_head (its dense copy
    costs more than mm loses)."""
    return [
        MatmulTile(kernel="gemv", max_m=1, min_n=16384, block_n=128, block_k=128, num_warps=8, num_stages=3, programs_per_sm=8),
        MatmulTile(kernel="gemv", max_m=1, block_n=64, block_k=128, num_warps=4, num_stages=3, programs_per_sm=8),
        MatmulTile(kernel="slices", max_m=16, block_m=16, block_n=128, block_k=128, num_warps=8, num_stages=3, programs_per_sm=1),
        MatmulTile(kernel="mm", max_m=128, block_m=64, block_n=128, min_block_n=64, block_k=64, num_warps=4, num_stages=4,
                   programs_per_sm=2, swap_ab=True, join_codes=True),
        MatmulTile(kernel="mm", min_n=32768, block_m=128, block_n=128, block_k=64, num_warps=4, num_stages=4),
        MatmulTile(kernel="dense", block_n=64, block_k=128, num_warps=4, num_stages=3),
    ]


class Fp8Tile(BaseModel):
    """One row of the fp8 (W8A8) Triton kernel's tile table (config `fp8_tiles`): the launch for
    products whose activation has at most max_m rows (none: any). The first matching row wins."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_m: MaxRows = Field(None, description="the most activation rows this row covers; none: any number")
    block_m: StrictInt = Field(description="activation rows per program (power of two, 16..256)")
    block_n: StrictInt = Field(description="weight output rows per program (power of two, 16..256)")
    block_k: StrictInt = Field(description="fp8 values along the input per step (power of two, 32..256)")
    num_warps: Warps = Field(4, description="warps per program (power of two, 1..32)")
    num_stages: Stages = Field(4, description="software-pipelining stages of the k loop (1..8)")

    @field_validator("block_m", "block_n")
    @classmethod
    def _tile_power_of_two(cls, value: int, info: ValidationInfo) -> int:
        return _power_of_two(info.field_name, value, MIN_TILE, MAX_TILE)

    @field_validator("block_k")
    @classmethod
    def _block_k_power_of_two(cls, value: int) -> int:
        return _power_of_two("block_k", value, 32, MAX_TILE)  # fp8 tl.dot takes k in steps of 32

    def launch(self) -> tuple[int | None, int, int, int, int, int]:
        """(max_m, block_m, block_n, block_k, num_warps, num_stages): the row as the kernels read it."""
        return self.max_m, self.block_m, self.block_n, self.block_k, self.num_warps, self.num_stages

    def summary(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k}, {self.num_warps} warps, {self.num_stages} stages"


# Up to this many rows the fp8 Triton kernel runs even where cuBLASLt's would: H100, each
# Llama-3.2-1B projection at 1 and 16 rows (fp8_rows included, CUDA graphs after an L2 flush), it
# took 0.69-1.00x cuBLASLt row-wise's time (2048x8192: 20.6 against 29.9 us at one row).
FP8_TRITON_MAX_ROWS = 16


def measured_fp8_tiles() -> list[Fp8Tile]:
    """The fp8 kernel's tiles by activation rows (H100, Llama-3.2-1B's projections): 16-row tiles
    up to 16 rows, 64 up to 64, then 128 x 128 on 8 warps."""
    return [
        Fp8Tile(max_m=16, block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4),
        Fp8Tile(max_m=64, block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=4),
        Fp8Tile(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=4),
    ]
