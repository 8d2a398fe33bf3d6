"""`vibee bench tiles --quant none`: the decoder spec's one-token GEMV of 16-bit weights, its launch
tiles timed per weight on this GPU beside cuBLAS (F.linear), and the `gemv_tiles` table that takes
each weight's fastest (first match by max_n, min_k). The shipped rows are an H100's; the sweep
retunes them for the GPU it runs on."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from vibee.bench.tile_sweep import Measured
from vibee.kinds.decoder.config import MAX_TILE_ELEMENTS, GemvTile


def gemv_candidates() -> list[GemvTile]:
    """The launches timed: 1-16 weight rows a program, 128-1024 inputs a step, 2-8 warps, the k loop
    pipelined (3 stages) or not; tiles of more float32 partial sums than a program's registers hold
    (over MAX_TILE_ELEMENTS, or 128 a thread) are left out."""
    return [GemvTile(block_n=bn, block_k=bk, num_warps=w, num_stages=s)
            for bn in (1, 2, 4, 8, 16) for bk in (128, 256, 512, 1024) for w in (2, 4, 8) for s in (1, 3)
            if bn * bk <= MAX_TILE_ELEMENTS and bn * bk <= 128 * 32 * w]


def sweep_gemv(decoder, weights: Sequence[tuple[int, int]], *, device: str, dtype: torch.dtype,
               time_call: Callable[[Sequence[Callable[[], object]], str], float],
               on_product: Callable[[str], None] = lambda _: None,
               operand_copies: Callable[[int, str], int] = lambda nbytes, device: 1) -> list[Measured]:
    """Time F.linear, the spec's own launch and every gemv_candidates() launch of `decoder`'s (a
    generated decoder module's) triton_gemv on one row and every [n, k] weight (random, near a
    trained model's), each call over operand_copies(bytes, device) copies of the weight. A launch
    whose product is off F.linear's in float32 by more than 1% is dropped."""
    results = []
    for n, k in weights:
        on_product(f"1x{k} @ {k}x{n}")
        gen = torch.Generator(device="cpu").manual_seed(n * 31 + k)
        weight = (torch.randn(n, k, generator=gen) * 0.02).to(device=device, dtype=dtype)
        copies = [weight] + [weight.clone() for _ in range(operand_copies(weight.numel() * weight.element_size(), device) - 1)]
        x = torch.randn(1, k, generator=gen).to(device=device, dtype=dtype)
        want = F.linear(x.float(), weight.float())
        measured = Measured(n, k, 1, time_call([lambda w=w: F.linear(x, w) for w in copies], device),
                            time_call([lambda w=w: decoder.triton_gemv(x, w) for w in copies], device), gemv_candidates())
        for tile in measured.tiles:
            launch = decoder.GemvTile(**tile.model_dump())
            measured.add(lambda t=launch: decoder.triton_gemv(x, weight, tile=t), want,
                         lambda t=launch: time_call([lambda w=w: decoder.triton_gemv(x, w, tile=t) for w in copies], device),
                         tolerance=0.01)
        results.append(measured)
    return results


def derive_gemv_table(results: Sequence[Measured]) -> list[GemvTile]:
    """A first-match table that gives each timed weight its fastest launch: a row (max_n = N, min_k
    = K) for each, the deepest weights first and, among equal depths, the narrowest (so no row takes
    a weight before its own); the last row covers any weight (max_n none, min_k 0), so an untimed
    weight takes the first row whose corner holds it. A launch that computed a wrong product on any
    weight is taken nowhere."""
    wrong = {r.tiles[i] for r in results for i in r.wrong}
    best = {}
    for r in results:
        times = [(t, i) for i, t in enumerate(r.times) if t is not None and r.tiles[i] not in wrong]
        if not times:
            raise ValueError(f"no launch ran the {r.n} x {r.k} weight correctly")
        best[(r.n, r.k)] = r.tiles[min(times)[1]]
    ordered = sorted(best, key=lambda nk: (-nk[1], nk[0]))
    rows = [best[nk].model_copy(update={"max_n": nk[0], "min_k": nk[1]}) for nk in ordered]
    rows[-1] = rows[-1].model_copy(update={"max_n": None, "min_k": 0})
    return rows


def gemv_spec_lines(table: Sequence[GemvTile]) -> list[str]:
    """The table as the spec writes it (`gemv_tiles:` rows; max_n and min_k left out where they take any)."""
    lines = []
    for tile in table:
        fields = {k: v for k, v in tile.model_dump().items() if not (k == "max_n" and v is None) and not (k == "min_k" and v == 0)}
        lines.append("    - {" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}")
    return lines


_GEMV_BLOCK = re.compile(r"^  gemv_tiles:\n(?:    - .*\n)+", re.M)


def paste_gemv_table(spec_text: str, table: Sequence[GemvTile]) -> str:
    """spec_text with its config's `gemv_tiles:` rows replaced by table's; everything else kept."""
    if len(_GEMV_BLOCK.findall(spec_text)) != 1:
        raise ValueError("the spec has no `gemv_tiles:` block (one `- {...}` row a line, under its config) to replace")
    return _GEMV_BLOCK.sub(lambda _: "  gemv_tiles:\n" + "\n".join(gemv_spec_lines(table)) + "\n", spec_text, count=1)
