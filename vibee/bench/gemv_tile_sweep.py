"""`vibee bench tiles --quant none`: the decoder spec's one-token GEMV of 16-bit weights, its launch
tiles timed per weight on this GPU beside cuBLAS (F.linear), each weight run as a step runs it
(QKV's with RoPE's epilogue, gate_up's with silu * up's), and the `gemv_tiles` table that takes each
weight's fastest (first match by max_n, min_k). The shipped rows are an H100's; the sweep retunes
them for the GPU it runs on."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Epilogue:
    """How a one-token step runs a weight: the plain GEMV, a merged gate_up projection's with silu *
    up ("silu_mul"), or a QKV projection's with RoPE and the K/V store ("rope", of these heads)."""

    kind: str = "plain"
    q_heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0


def shapes_epilogues(shapes: Sequence[str]) -> dict[tuple[int, int], Epilogue]:
    """The [n, k] weights of known shapes that a one-token step runs through an epilogue: QKV's and gate_up's."""
    from vibee.runtime.shapes import shape_config

    epilogues = {}
    for shape in shapes:
        c = shape_config(shape)
        epilogues[((c.num_heads + 2 * c.num_kv_heads) * c.head_dim, c.hidden_size)] = Epilogue(
            "rope", c.num_heads, c.num_kv_heads, c.head_dim)
        epilogues[(2 * c.intermediate_size, c.hidden_size)] = Epilogue("silu_mul")
    return epilogues


def _runner(decoder, x: torch.Tensor, weight: torch.Tensor, epilogue: Epilogue) -> tuple[Callable, torch.Tensor]:
    """run(w, tile) launching the weight's kernel on one row x (tile None: the spec's launch), and the
    float32 result it should give (its rotation or silu * up done in float32 by torch)."""
    y = F.linear(x.float(), weight.float())
    if epilogue.kind == "silu_mul":
        gate, up = y.chunk(2, dim=-1)
        return (lambda w, tile: decoder.triton_gemv_silu_mul(x, w, tile=tile)), F.silu(gate) * up
    if epilogue.kind == "rope":
        h, kv, d = epilogue.q_heads, epilogue.kv_heads, epilogue.head_dim
        position = torch.tensor([100], device=x.device)
        inv_freq = 1.0 / 10000.0 ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
        pages = [torch.zeros(4, 16, kv, d, dtype=x.dtype, device=x.device) for _ in range(2)]
        rope = decoder.RopeTarget(position, inv_freq, 1.0, h, kv, d, torch.tensor([3], device=x.device), *pages)
        q, k, v = y.split([h * d, kv * d, kv * d], dim=-1)
        q, k = decoder.torch_apply_rope_qk(q.view(1, h, d), k.view(1, kv, d), position, inv_freq, 1.0)
        want = torch.cat([q.reshape(1, -1), k.reshape(1, -1), v], dim=-1)
        return (lambda w, tile: decoder.triton_gemv_rope(x, w, None, rope, tile=tile)), want
    return (lambda w, tile: decoder.triton_gemv(x, w, tile=tile)), y


def sweep_gemv(decoder, weights: Sequence[tuple[int, int]], *, device: str, dtype: torch.dtype,
               time_call: Callable[[Sequence[Callable[[], object]], str], float],
               epilogues: Mapping[tuple[int, int], Epilogue] | None = None,
               on_product: Callable[[str], None] = lambda _: None,
               operand_copies: Callable[[int, str], int] = lambda nbytes, device: 1) -> list[Measured]:
    """Time F.linear, the spec's own launch and every gemv_candidates() launch of `decoder`'s (a
    generated decoder module's) GEMV on one row of every [n, k] weight (random, near a trained
    model's), as a step runs it (epilogues: the weights that take silu * up or RoPE's; the plain
    GEMV otherwise), each call over operand_copies(bytes, device) copies of the weight. A launch
    whose result is off the float32 one by more than 1% is dropped."""
    results = []
    for n, k in weights:
        epilogue = (epilogues or {}).get((n, k), Epilogue())
        on_product(f"1x{k} @ {k}x{n}" + ("" if epilogue.kind == "plain" else f" ({epilogue.kind})"))
        gen = torch.Generator(device="cpu").manual_seed(n * 31 + k)
        weight = (torch.randn(n, k, generator=gen) * 0.02).to(device=device, dtype=dtype)
        copies = [weight] + [weight.clone() for _ in range(operand_copies(weight.numel() * weight.element_size(), device) - 1)]
        x = torch.randn(1, k, generator=gen).to(device=device, dtype=dtype)
        run, want = _runner(decoder, x, weight, epilogue)
        measured = Measured(n, k, 1, time_call([lambda w=w: F.linear(x, w) for w in copies], device),
                            time_call([lambda w=w: run(w, None) for w in copies], device), gemv_candidates())
        for tile in measured.tiles:
            launch = decoder.GemvTile(**tile.model_dump())
            measured.add(lambda t=launch: run(weight, t), want,
                         lambda t=launch: time_call([lambda w=w: run(w, t) for w in copies], device), tolerance=0.01)
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
