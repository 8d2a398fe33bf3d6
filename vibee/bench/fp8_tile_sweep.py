"""`vibee bench tiles --quant fp8`: the W8A8 Triton kernel's launch tiles timed per row count and
weight on this GPU beside cuBLASLt's fp8 GEMM, and the spec's `fp8_tiles` (first match by max_m)
and `fp8_triton_max_rows` (up to how many rows the Triton kernel runs where cuBLASLt could) that
take the fastest. The shipped values were timed on an H100; retuning them is this one command."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vibee.bench.tile_sweep import Measured, products
from vibee.kinds.quantization.tiles import Fp8Tile


def fp8_candidates(m: int) -> list[Fp8Tile]:
    """The launches timed for m activation rows: tiles one power of two tall over m (16..128) and,
    past 16 rows, half that; 64 or 128 weight rows; 128 or 256 deep; 4 warps on 3 or 4 stages, or
    8 on 4. A launch whose tiles do not fit a GPU's shared memory fails there and is skipped."""
    tall = min(max(16, 1 << (m - 1).bit_length()), 128)
    heights = [tall] + ([tall // 2] if m > 16 and tall > 16 else [])
    return [Fp8Tile(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=s)
            for bm in heights for bn in (64, 128) for bk in (128, 256) for w, s in ((4, 3), (4, 4), (8, 4))]


@dataclass
class Fp8Measured(Measured):
    """Measured, and cuBLASLt's fp8 GEMM on the same product (the row rounding included, as in the
    Triton launches); None where this torch or GPU has none."""

    cublas_s: float | None = None


def sweep_fp8(quant, weights: Sequence[tuple[int, int]], rows: Sequence[int], *, device: str, dtype: torch.dtype,
              time_call: Callable[[Sequence[Callable[[], object]], str], float],
              on_product: Callable[[str], None] = lambda _: None,
              operand_copies: Callable[[int, str], int] = lambda nbytes, device: 1) -> list[Fp8Measured]:
    """Time every fp8_candidates(m) launch of `quant`'s (a generated fp8 quantization module)
    fp8_linear, the spec's own choice and cuBLASLt on every [n, k] weight at each row count, each
    call over operand_copies(bytes, device) copies of the weight. A launch whose product is off
    by more than 1% from the dequantized weight's with the fp8-rounded rows is dropped."""
    results = []
    for p in products(quant, weights, rows, device=device, dtype=dtype, on_product=on_product,
                      operand_copies=operand_copies):
        x, qws = p.x, p.qws
        codes, scale = quant.fp8_rows(x)  # x rounded to fp8 per row, as every launch rounds it
        want = F.linear(codes.float() * scale.reshape(-1, 1).float(), p.dense.float())
        cublas = quant.cublas_fp8(codes, scale, qws[0].qweight, qws[0].scales, dtype)
        measured = Fp8Measured(
            p.n, p.k, p.m, time_call([lambda w=w: F.linear(x, w) for w in p.weights], device),
            time_call([lambda q=q: quant.triton_quant_linear(x, q) for q in qws], device), fp8_candidates(p.m),
            cublas_s=None if cublas is None else time_call(
                [lambda q=q: quant.cublas_fp8(*quant.fp8_rows(x), q.qweight, q.scales, dtype) for q in qws], device))
        for tile in measured.tiles:
            launch = tile.launch()[1:]
            measured.add(lambda t=launch: quant.fp8_linear(x, qws[0].qweight, qws[0].scales, None, tile=t), want,
                         lambda t=launch: time_call([lambda q=q: quant.fp8_linear(x, q.qweight, q.scales, None, tile=t)
                                                     for q in qws], device), tolerance=0.01)
        results.append(measured)
    return results


def _summed(results: Sequence[Fp8Measured], m: int, wrong: set[Fp8Tile]) -> dict[Fp8Tile, float]:
    """Each candidate's time over bf16's summed over the weights at m rows (inf: it failed somewhere)."""
    summed: dict[Fp8Tile, float] = defaultdict(float)
    for r in (r for r in results if r.m == m):
        for tile, t in zip(r.tiles, r.times):
            summed[tile] += math.inf if t is None or tile in wrong else t / r.dense_s
    return summed


def derive_fp8(results: Sequence[Fp8Measured], current_max_rows: int) -> tuple[list[Fp8Tile], int]:
    """(fp8_tiles, fp8_triton_max_rows): for each row count the launch with the least summed time
    over bf16's across the weights (neighbouring counts with one best merge into one row, the last
    any M); and the most swept rows up to which that launch's summed time is at most cuBLASLt's
    at every swept count from the fewest (0 where cuBLASLt is ahead from the first; current_max_rows
    where there is no cuBLASLt to compare with). A launch wrong anywhere is taken nowhere."""
    counts = sorted({r.m for r in results})
    wrong = {r.tiles[c] for r in results for c in r.wrong}
    rows: list[Fp8Tile] = []
    max_rows, ahead = 0, True
    compare = all(r.cublas_s is not None for r in results)
    for i, m in enumerate(counts):
        summed = _summed(results, m, wrong)
        best = min(summed, key=summed.get)
        if math.isinf(summed[best]):
            raise ValueError(f"no fp8 launch ran correctly at {m} rows on every weight")
        bound = None if i == len(counts) - 1 else m
        if rows and rows[-1].launch()[1:] == best.launch()[1:]:
            rows[-1] = rows[-1].model_copy(update={"max_m": bound})
        else:
            rows.append(best.model_copy(update={"max_m": bound}))
        cublas = sum(r.cublas_s / r.dense_s for r in results if r.m == m) if compare else math.inf
        ahead = ahead and summed[best] <= cublas
        max_rows = m if ahead else max_rows
    return rows, max_rows if compare else current_max_rows


def fp8_spec_lines(table: Sequence[Fp8Tile]) -> list[str]:
    """The table as the spec writes it (`fp8_tiles:` rows, fields at their defaults omitted)."""
    default = {name: f.default for name, f in Fp8Tile.model_fields.items() if f.default is not None}
    return ["    - {" + ", ".join(f"{k}: {v}" for k, v in tile.model_dump().items()
                                   if v is not None and not (k in default and v == default[k])) + "}"
            for tile in table]


_FP8_BLOCK = re.compile(r"^  fp8_tiles:\n(?:    - .*\n)+", re.M)
_FP8_ROWS = re.compile(r"^(  fp8_triton_max_rows:[ \t]*)\d+", re.M)


def paste_fp8(spec_text: str, table: Sequence[Fp8Tile], max_rows: int) -> str:
    """spec_text with its config's `fp8_tiles:` rows and `fp8_triton_max_rows:` value replaced;
    everything else (comments included) kept as it was."""
    if len(_FP8_BLOCK.findall(spec_text)) != 1 or len(_FP8_ROWS.findall(spec_text)) != 1:
        raise ValueError("the spec has no `fp8_tiles:` block (one `- {...}` row a line) and `fp8_triton_max_rows:` "
                         "line under its config to replace")
    text = _FP8_BLOCK.sub(lambda _: "  fp8_tiles:\n" + "\n".join(fp8_spec_lines(table)) + "\n", spec_text, count=1)
    return _FP8_ROWS.sub(lambda match: f"{match.group(1)}{max_rows}", text, count=1)
