"""`vibee bench tiles`: the quantized kernels' launch tiles timed per row count and weight shape on
this GPU, and the spec `tiles:` table that takes the fastest (first match by max_m, min_n). The
shipped table was tuned on an H100 and the H200 prefers others (128 rows: 1.09-1.18x bf16's time
there, 1.28-1.78x here), so retuning for a GPU is one command, its output pasted into the spec."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vibee.kinds.quantization.tiles import MatmulTile


def candidates(m: int, wgmma: bool = True) -> list[MatmulTile]:
    """The tiles timed for m activation rows: the GEMV's for one row (64-256 rows, its k loop
    pipelined or not); code-position slices up to 16;
    mm tiles m rows tall (16..256) both ways round, 64 or 128 wide and deep, split over k or not up
    to 128 rows; wgmma tiles m rows tall (64..256) from 32 rows, 64 or 128 weight rows on one or two
    warpgroups, 64 deep on 2-4 stages (or 6, up to 128 rows tall) or 128 deep on 2-3, split over k to one program per SM, two or
    not (wgmma: where the kernel runs, an sm_90 GPU; elsewhere its launch is an mm tile);
    dequantize-then-cuBLAS from 32."""
    if m == 1:  # 1 stage: each tile's words loaded when it is reached; 3: two tiles ahead (cp.async)
        return [MatmulTile(kernel="gemv", max_m=1, block_n=bn, block_k=128, num_warps=w, num_stages=stages, programs_per_sm=p)
                for bn, w in ((64, 4), (128, 4), (128, 8), (256, 8)) for p in (4, 8) for stages in (1, 3)]
    tiles = []
    if m <= 16:
        tiles += [MatmulTile(kernel="slices", block_m=16, block_n=bn, block_k=128, num_warps=w, num_stages=3, programs_per_sm=p)
                  for bn, w in ((64, 4), (128, 8)) for p in (1, 2)]
    block_m = min(max(16, 1 << (m - 1).bit_length()), 256)
    tiles += [MatmulTile(kernel="mm", block_m=block_m, block_n=bn, block_k=bk, num_warps=8 if block_m == 256 else 4,
                         num_stages=3, programs_per_sm=p, swap_ab=swap, join_codes=True)
              for swap in (True, False) for bn in (64, 128) for bk in (64, 128) for p in ((0, 2) if m <= 128 else (0,))]
    if m >= 32 and wgmma:  # Hopper's wgmma kernel, 64 or 128 weight rows
        wgmma_m = max(block_m, 64)
        shapes = [(64, 4)] + [(128, w) for w in {64: (4, 8), 128: (4, 8), 256: (8,)}[wgmma_m]]  # (block_n, warps)
        # 2-4 stages: fewer leave shared memory for a second or third program per SM (its latency hiding);
        # 6 where x's tile is at most 128 rows (it fits beside them); 128 deep: half the k loop's waits,
        # twice x's tile a stage (2-3 stages fit)
        shallow = (2, 3, 4, 6) if wgmma_m <= 128 else (2, 3, 4)
        tiles += [MatmulTile(kernel="wgmma", block_m=wgmma_m, block_n=bn, block_k=bk, num_warps=w, num_stages=stages,
                             programs_per_sm=p) for bn, w in shapes for bk, depths in ((64, shallow), (128, (2, 3)))
                  for stages in depths for p in (0, 1, 2)]
    if m >= 32:
        tiles.append(MatmulTile(kernel="dense", block_n=64, block_k=128, num_warps=4, num_stages=3))
    return tiles


@dataclass
class Measured:
    """One product [m, k] @ [k, n]: bf16's (the dense dtype's) F.linear time, the spec's current
    table's, the candidates timed and each one's time (None where it did not launch, see errors, or
    its product was wrong)."""

    n: int
    k: int
    m: int
    dense_s: float
    table_s: float
    tiles: list[MatmulTile]
    times: list[float | None] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)  # candidate -> why it did not launch
    wrong: dict[int, float] = field(default_factory=dict)  # candidate -> its product's relative error (> 1%)

    def best(self) -> int:
        """Index of the fastest correct candidate."""
        return min((t, i) for i, t in enumerate(self.times) if t is not None)[1]

    def add(self, launch: Callable[[], torch.Tensor], want: torch.Tensor, timed: Callable[[], float],
            tolerance: float) -> None:
        """The next candidate's time: timed() when launch() runs and its product is within tolerance
        of want (relative); else None, and why in errors or wrong."""
        try:
            y = launch()
        except Exception as exc:  # noqa: BLE001 (a launch this GPU or product cannot take: shared memory, registers)
            self.errors[len(self.times)] = f"{type(exc).__name__}: {str(exc)[:200]}"
            self.times.append(None)
            return
        error = ((y.float() - want).norm() / want.norm()).item()
        if not error <= tolerance:  # NaN included
            self.wrong[len(self.times)] = error
            self.times.append(None)
            return
        self.times.append(timed())


@dataclass
class Product:
    """One [m, k] @ [k, n] product of a sweep: its activation rows x, copies of a random weight
    quantized by the spec's quantizer (qws[0] the one whose products are checked) and dense
    (weights), and qws[0] dequantized."""

    n: int
    k: int
    m: int
    x: torch.Tensor
    qws: list
    weights: list[torch.Tensor]
    dense: torch.Tensor


def products(quant, weights: Sequence[tuple[int, int]], rows: Sequence[int], *, device: str, dtype: torch.dtype,
             on_product: Callable[[str], None], operand_copies: Callable[[int, str], int]) -> Iterator[Product]:
    """Each product of every [n, k] weight at each row count (on_product(name) as it starts), with
    operand_copies(bytes, device) copies of the weight, so that a timed call reads its weight from
    memory, not L2 (a model's layers: bench/kernels.py's time_call says why)."""
    for n, k in weights:
        gen = torch.Generator(device="cpu").manual_seed(n * 31 + k)
        weight = (torch.randn(n, k, generator=gen) * 0.02).to(device=device, dtype=dtype)
        qw = quant.quantize_weight(weight, dtype=dtype)
        copies = operand_copies(sum(t.numel() * t.element_size() for t in (qw.qweight, qw.scales, qw.zeros)
                                    if t is not None), device)
        qws = [qw] + [quant.quantize_weight(weight, dtype=dtype) for _ in range(copies - 1)]
        dense_copies = [weight] + [weight.clone() for _ in range(copies - 1)]
        dense = quant.dequantize(qw)
        for m in rows:
            on_product(f"{m}x{k} @ {k}x{n}")
            x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
            yield Product(n, k, m, x, qws, dense_copies, dense)


def sweep(quant, weights: Sequence[tuple[int, int]], rows: Sequence[int], *, device: str, dtype: torch.dtype,
          time_call: Callable[[Sequence[Callable[[], object]], str], float],
          on_product: Callable[[str], None] = lambda _: None, wgmma: bool = True,
          operand_copies: Callable[[int, str], int] = lambda nbytes, device: 1) -> list[Measured]:
    """Time every candidate (candidates(m, wgmma)) on every [n, k] weight (random, quantized by the
    spec's quantizer) at each row count, each call over operand_copies(bytes, device) distinct
    copies of the weight (a model's layers: bench/kernels.py's time_call says why). A candidate
    whose product is off the dequantized weight's by more than 1% is dropped."""
    results = []
    for p in products(quant, weights, rows, device=device, dtype=dtype, on_product=on_product,
                      operand_copies=operand_copies):
        x, qws = p.x, p.qws
        want = F.linear(x.float(), p.dense.float())
        measured = Measured(p.n, p.k, p.m, time_call([lambda w=w: F.linear(x, w) for w in p.weights], device),
                            time_call([lambda q=q: quant.triton_quant_linear(x, q) for q in qws], device),
                            candidates(p.m, wgmma))
        for tile in measured.tiles:
            config = quant.pick_launch((quant.LaunchTile(**tile.model_dump()),), p.m, p.n, p.k, x.device)
            measured.add(lambda c=config: quant.triton_quant_linear(x, qws[0], config=c), want,
                         lambda c=config: time_call([lambda q=q: quant.triton_quant_linear(x, q, config=c)
                                                     for q in qws], device), tolerance=0.01)
        results.append(measured)
    return results


def derive_table(results: Sequence[Measured]) -> list[MatmulTile]:
    """The first-match table that takes, for each row count and weight width, the candidate with the
    least summed time over bf16's among the weights of that width (widths sharing a best merge into
    one row; the narrowest run of a row count takes min_n 0, the last row count any M). A launch
    that computed a wrong product anywhere is taken nowhere: its bug may hide at a shape not swept."""
    rows: list[MatmulTile] = []
    counts = sorted({r.m for r in results})
    wrong = {r.tiles[c] for r in results for c in r.wrong}
    for i, m in enumerate(counts):
        by_width: dict[int, dict[MatmulTile, float]] = defaultdict(lambda: defaultdict(float))
        for r in (r for r in results if r.m == m):
            for tile, t in zip(r.tiles, r.times):
                by_width[r.n][tile] += float("inf") if t is None or tile in wrong else t / r.dense_s
        runs: list[tuple[MatmulTile, int]] = []  # (candidate, narrowest width), widest first
        for n in sorted(by_width, reverse=True):
            best = min(by_width[n], key=by_width[n].get)
            if runs and runs[-1][0] == best:
                runs[-1] = (best, n)
            else:
                runs.append((best, n))
        for j, (tile, n) in enumerate(runs):
            rows.append(tile.model_copy(update={"max_m": None if i == len(counts) - 1 else m,
                                                "min_n": 0 if j == len(runs) - 1 else n}))
    return rows


def splice_table(swept: Sequence[MatmulTile], current: Sequence[MatmulTile], largest: int,
                 smallest: int = 1) -> list[MatmulTile]:
    """swept (derive_table's, from row counts smallest..largest) in place of current's rows for
    those counts, so that a sweep of a few row counts retunes only them: current's rows for fewer
    rows than smallest (max_m under it: `--rows 16,...` keeps the GEMV's) come first; where current
    has rows for more rows than largest (max_m over it), swept's last row count stops at largest and
    those rows follow it; otherwise swept runs to any M."""
    below = [t for t in current if t.max_m is not None and t.max_m < smallest]
    beyond = [t for t in current if t.max_m is None or t.max_m > largest]
    if any(t.max_m is not None for t in beyond):
        swept = [t.model_copy(update={"max_m": largest}) if t.max_m is None else t for t in swept]
        return below + list(swept) + beyond
    return below + list(swept)


def gpu_rows(swept: Sequence[MatmulTile], current: Sequence[MatmulTile], smallest: int, largest: int,
             gpu: str) -> list[MatmulTile]:
    """current with swept's rows (derive_table's, from row counts smallest..largest) as rows for
    this `gpu` alone: tagged with it, the last one stopping at largest, placed where current's rows
    for smallest rows begin (rows for fewer rows stay ahead of them: the table is first-match), in
    place of current's rows for that gpu over those counts; the rows for any device and for other
    GPUs are kept as they are."""
    tagged = [t.model_copy(update={"gpu": gpu, "max_m": largest if t.max_m is None else t.max_m}) for t in swept]
    kept = [t for t in current if not (t.gpu == gpu and t.max_m is not None and smallest <= t.max_m <= largest)]
    at = next((i for i, t in enumerate(kept) if t.max_m is None or t.max_m >= smallest), len(kept))
    return kept[:at] + tagged + kept[at:]


def spec_lines(table: Sequence[MatmulTile]) -> list[str]:
    """The table as the spec writes it (`tiles:` rows, fields left at their defaults omitted)."""
    default = {name: f.default for name, f in MatmulTile.model_fields.items() if f.default is not None}
    lines = []
    for tile in table:
        fields = {k: v for k, v in tile.model_dump().items()
                  if not (k in default and v == default[k]) and not (k == "min_block_n" and v == tile.block_n)
                  and v is not None}
        lines.append("    - {" + ", ".join(f"{k}: {_spec_value(k, v)}" for k, v in fields.items()) + "}")
    return lines


def _spec_value(key: str, value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f'"{value}"' if key == "gpu" else str(value)  # a GPU's name may hold spaces (its validator: no quotes)


_TILES_BLOCK = re.compile(r"^  tiles:\n(?:    - .*\n)+", re.M)


def paste_table(spec_text: str, table: Sequence[MatmulTile]) -> str:
    """spec_text with its config's `tiles:` rows replaced by table's; everything else (the comments
    above the block included) kept as it was."""
    if len(_TILES_BLOCK.findall(spec_text)) != 1:
        raise ValueError("the spec has no `tiles:` block (one `- {...}` row a line, under its config) to replace")
    return _TILES_BLOCK.sub(lambda _: "  tiles:\n" + "\n".join(spec_lines(table)) + "\n", spec_text, count=1)
