"""Kernel benchmarks of a generated flash_attention module (triton target) on one CUDA GPU.

    python -m vibee.bench.kernels_attention [--module vibee_gen.igla_flash_attention] [--json OUT]

prefill: causal bf16 over a paged cache (shuffled pages), batch 8, 32 heads, 4096 tokens, head
  dim 128; TFLOP/s counting 4 * B * H * S^2 * D / 2 (the causal half of QK^T and PV). Timed
  through the public paged_prefill (autotuned), then with each tile pinned, against torch SDPA
  (is_causal=True) on contiguous [B, H, S, D] tensors.
decode: bf16, batch 64, 4096 keys per sequence, 32 query / 8 KV heads, head dim 128, the
  module's page size; TB/s of KV read, 2 * B * KV * Hkv * D * 2 bytes. Timed through the
  public paged_decode (host checks and their device sync included) and through the kernel
  launches alone, against torch SDPA (enable_gqa) on contiguous K/V.
Times are triton.testing.do_bench medians (ms) over CUDA events, L2 flushed between runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from typing import Any

import torch


def _bench(fn, rep: int = 200) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def _host_ms(fn, calls: int = 20) -> float:
    """Wall time of one call on an idle GPU, kernels excluded as far as the host can tell: the
    host-side checks, device reads and launches of a public call."""
    import time

    total = 0.0
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        total += time.perf_counter() - start
    torch.cuda.synchronize()
    return total / calls * 1e3


# Pages of the shipped kv_cache's block size; the kernels take any page size from the cache's shape.
PAGE_SIZE = 16


def _shuffled_pages(batch: int, tokens: int, page_size: int, kv_heads: int, head_dim: int, dtype, gen):
    pages_per_seq = -(-tokens // page_size)
    num_pages = batch * pages_per_seq
    k_cache = torch.randn(num_pages, page_size, kv_heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    v_cache = torch.randn(num_pages, page_size, kv_heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    order = torch.randperm(num_pages, device="cuda", generator=gen).to(torch.int32)
    return k_cache, v_cache, order.view(batch, pages_per_seq)


def _contiguous(cache: torch.Tensor, tables: torch.Tensor, tokens: int) -> torch.Tensor:
    """[B, Hkv, tokens, D]: each sequence's pages laid end to end."""
    batch = tables.shape[0]
    return cache[tables.long()].reshape(batch, -1, cache.shape[2], cache.shape[3])[:, :tokens].transpose(1, 2).contiguous()


def bench_prefill(fa, batch=8, heads=32, seq=4096, head_dim=128, tiles=()) -> dict[str, Any]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    dtype = torch.bfloat16
    q = torch.randn(batch * seq, heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    k_cache, v_cache, tables = _shuffled_pages(batch, seq, PAGE_SIZE, heads, head_dim, dtype, gen)
    cu = torch.arange(0, (batch + 1) * seq, seq, device="cuda", dtype=torch.int32)
    lens = torch.full((batch,), seq, device="cuda", dtype=torch.int32)
    flops = 4 * batch * heads * seq * seq * head_dim / 2

    def tflops(ms: float) -> float:
        return flops / (ms * 1e-3) / 1e12

    result: dict[str, Any] = {"shape": dict(batch=batch, heads=heads, seq=seq, head_dim=head_dim, dtype="bf16",
                                            page_size=PAGE_SIZE), "flop": flops}
    out = fa.paged_prefill(q, k_cache, v_cache, tables, cu, lens)  # autotunes on first call
    best = getattr(fa, "_prefill_autotuned", None)
    ms = _bench(lambda: fa.paged_prefill(q, k_cache, v_cache, tables, cu, lens))
    result["paged_prefill"] = {"ms": ms, "tflops": tflops(ms),
                               "autotune_choice": str(best.best_config) if best is not None else None}
    pinned = {}
    for tile in [fa.DEFAULT_TILE, *fa.AUTOTUNE_CONFIGS, *tiles]:
        tile = fa.TileConfig(*tile)
        key = "x".join(map(str, tile))
        if key in pinned:
            continue
        try:
            ms = _bench(lambda: fa.paged_prefill(q, k_cache, v_cache, tables, cu, lens, tile=tile))
            pinned[key] = {"ms": ms, "tflops": tflops(ms)}
        except Exception as exc:  # a tile that does not fit: record why
            pinned[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    result["pinned_tiles (block_m x block_n x warps x stages)"] = pinned

    # The same prefill with contiguous K/V (the kernel's varlen mode): what the paged gather costs.
    k_flat, v_flat = (_contiguous(c, tables, seq).transpose(1, 2).reshape(batch * seq, heads, head_dim)
                      for c in (k_cache, v_cache))
    contiguous = {}
    for tile in [fa.TileConfig(128, 128, 8, 3), fa.TileConfig(64, 64, 4, 4)]:
        ms = _bench(lambda: fa.varlen_attention(q, k_flat, v_flat, cu, cu, tile=tile))
        contiguous["x".join(map(str, tile))] = {"ms": ms, "tflops": tflops(ms)}
    result["varlen_attention (contiguous K/V), pinned tiles"] = contiguous
    result["host_ms_per_call"] = _host_ms(lambda: fa.paged_prefill(q, k_cache, v_cache, tables, cu, lens, tile=fa.DEFAULT_TILE), 5)
    qs = q.view(batch, seq, heads, head_dim).transpose(1, 2).contiguous()
    ks, vs = _contiguous(k_cache, tables, seq), _contiguous(v_cache, tables, seq)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    want = sdpa(qs, ks, vs, is_causal=True)
    ms = _bench(lambda: sdpa(qs, ks, vs, is_causal=True))
    result["torch_sdpa"] = {"ms": ms, "tflops": tflops(ms)}
    result["max_abs_diff_vs_sdpa"] = float((out.view(batch, seq, heads, head_dim).transpose(1, 2) - want).abs().max())
    return result


def bench_decode(fa, batch=64, kv_len=4096, heads=32, kv_heads=8, head_dim=128) -> dict[str, Any]:
    gen = torch.Generator(device="cuda").manual_seed(1)
    dtype = torch.bfloat16
    q = torch.randn(batch, heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    k_cache, v_cache, tables = _shuffled_pages(batch, kv_len, PAGE_SIZE, kv_heads, head_dim, dtype, gen)
    lens = torch.full((batch,), kv_len, device="cuda", dtype=torch.int32)
    kv_bytes = 2 * batch * kv_len * kv_heads * head_dim * 2

    def tbps(ms: float) -> float:
        return kv_bytes / (ms * 1e-3) / 1e12

    splits = fa.num_splits_for(kv_len)
    result: dict[str, Any] = {"shape": dict(batch=batch, kv_len=kv_len, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                            dtype="bf16", page_size=PAGE_SIZE, num_splits=splits), "kv_bytes": kv_bytes}
    out = fa.paged_decode(q, k_cache, v_cache, tables, lens)
    ms = _bench(lambda: fa.paged_decode(q, k_cache, v_cache, tables, lens))
    result["paged_decode"] = {"ms": ms, "tbps": tbps(ms)}
    launch = getattr(fa, "_launch_decode", None)
    if launch is not None:
        flags, scale = fa._kernel_variants(()), 1.0 / math.sqrt(head_dim)
        for s in sorted({splits, 1, 2, 4, 8}):
            ms = _bench(lambda: launch(q, k_cache, v_cache, tables, lens, s, flags, scale))
            result[f"kernels_only splits={s}"] = {"ms": ms, "tbps": tbps(ms)}
    # As the engine runs decode steps: captured in a CUDA graph with a fixed split count.
    lengths = lens.clone()
    fa.paged_decode(q, k_cache, v_cache, tables, lengths, num_splits=splits)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fa.paged_decode(q, k_cache, v_cache, tables, lengths, num_splits=splits)
    ms = _bench(graph.replay)
    result["paged_decode in a CUDA graph"] = {"ms": ms, "tbps": tbps(ms)}
    result["host_ms_per_eager_call"] = _host_ms(lambda: fa.paged_decode(q, k_cache, v_cache, tables, lens))
    qs = q.view(batch, heads, 1, head_dim)
    ks, vs = _contiguous(k_cache, tables, kv_len), _contiguous(v_cache, tables, kv_len)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    want = sdpa(qs, ks, vs, enable_gqa=True)
    ms = _bench(lambda: sdpa(qs, ks, vs, enable_gqa=True))
    result["torch_sdpa_contiguous"] = {"ms": ms, "tbps": tbps(ms)}
    result["max_abs_diff_vs_sdpa"] = float((out - want.view(batch, heads, head_dim)).abs().max())
    return result


def _tile(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(x) for x in text.split("x"))
    if len(parts) != 4:
        raise argparse.ArgumentTypeError("a tile is block_m x block_n x warps x stages, e.g. 128x128x8x3")
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", default="vibee_gen.igla_flash_attention", help="generated module (triton target)")
    parser.add_argument("--json", help="write the figures here too")
    parser.add_argument("--tile", action="append", type=_tile, default=[], help="extra prefill tile to time, e.g. 128x128x8x3")
    parser.add_argument("--only", choices=["prefill", "decode"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    fa = importlib.import_module(args.module)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton

    report["triton"] = triton.__version__
    if args.only in (None, "prefill"):
        report["prefill"] = bench_prefill(fa, tiles=args.tile)
        print(json.dumps({"prefill": report["prefill"]}, indent=2), flush=True)
    if args.only in (None, "decode"):
        report["decode"] = bench_decode(fa)
        print(json.dumps({"decode": report["decode"]}, indent=2), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
