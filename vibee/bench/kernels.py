"""`vibee bench kernels`: each generated kernel against its torch counterpart, as a rate against
a ceiling measured in the same run: the device's copy bandwidth for memory-bound kernels, its
matmul throughput for a GEMM, and torch SDPA's own rate for attention prefill (which no
kernel runs at matmul speed).

The generated modules are called through their public functions, so on a GPU this times the
Triton kernels the triton target dispatches to (on a CPU, the torch path at small shapes).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from vibee.bench.ceilings import measure_ceilings
from vibee.runtime.cuda_graphs import num_sms, splits_for_batch

SHAPES = {
    # The targets.
    "h100": dict(prefill=dict(batch=8, heads=32, kv_heads=32, seq=4096, head_dim=128),
                 decode=dict(batch=64, heads=32, kv_heads=8, kv_len=4096, head_dim=128),
                 gemv=dict(m=1, k=4096, n=14336), gemm=dict(m=256, k=4096, n=14336),
                 kv_write=dict(tokens=4096, kv_heads=8, head_dim=128),
                 token_mask=dict(batch=256, vocab=128256)),
    # Small enough for a CPU.
    "small": dict(prefill=dict(batch=2, heads=4, kv_heads=2, seq=128, head_dim=64),
                  decode=dict(batch=4, heads=4, kv_heads=2, kv_len=256, head_dim=64),
                  gemv=dict(m=1, k=256, n=512), gemm=dict(m=32, k=256, n=512),
                  kv_write=dict(tokens=128, kv_heads=2, head_dim=64),
                  token_mask=dict(batch=4, vocab=4096)),
}


@dataclass
class Timing:
    name: str
    shape: str
    unit: str  # "TFLOP/s" or "TB/s"
    work: float  # FLOPs or bytes of one call
    vibee_s: float
    baseline: str
    baseline_s: float | None
    ceiling: float | None  # in `unit`, measured in the same run
    ceiling_source: str  # what the ceiling is

    def rate(self, seconds: float | None) -> float | None:
        if seconds is None:
            return None
        return self.work / seconds / 1e12

    def row(self) -> dict[str, Any]:
        vibee_rate = self.rate(self.vibee_s)
        return {"kernel": self.name, "shape": self.shape, "unit": self.unit, "vibee_us": 1e6 * self.vibee_s,
                "vibee_rate": vibee_rate, "baseline": self.baseline,
                "baseline_us": None if self.baseline_s is None else 1e6 * self.baseline_s,
                "baseline_rate": self.rate(self.baseline_s), "ceiling": self.ceiling,
                "ceiling_source": self.ceiling_source,
                "fraction_of_ceiling": None if not self.ceiling else vibee_rate / self.ceiling}


def time_call(fn: Callable[[], Any] | Sequence[Callable[[], Any]], device: str, repeats: int = 50,
              graph: bool = True) -> float:
    """Median seconds per call. fn: one call, or several alike over distinct operands (a model's
    layers: see operand_copies). CUDA: the calls captured back to back in one CUDA graph and
    replayed, with L2 flushed before each replay by reading a buffer larger than it (weights come
    from HBM, as in a model), so the time is the GPU's alone: an eager call of a microsecond kernel
    is bound by its Python launch instead, and the engine runs decode in graphs too. graph=False,
    or calls that cannot be captured: timed eagerly by triton's do_bench (fine for
    milliseconds-long kernels). CPU: wall clock.

    Why several calls and a read: a graph of one kernel carries the graph's own launch (an empty
    kernel times 4.9 us on an H100), and a flush that writes (zero_) leaves L2 full of dirty lines
    whose write-back the timed kernel pays for. Reading 29 MB on an H100 (2026-12-06): 18.4 us
    a call after a zero_ flush, 14.3 after a read, 11.8 a call with eight buffers in one graph."""
    fns = list(fn) if isinstance(fn, Sequence) else [fn]

    def run_all() -> None:
        for f in fns:
            f()

    if device.startswith("cuda"):
        if not graph:
            import triton.testing

            return triton.testing.do_bench(run_all, warmup=10, rep=max(20, repeats), return_mode="median") / 1000.0 / len(fns)
        return _time_cuda_graph(run_all, repeats) / len(fns)
    run_all()
    times = []
    for _ in range(max(3, repeats // 4)):
        t0 = time.perf_counter()
        run_all()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] / len(fns)


def operand_copies(nbytes: int, device: str, least: int = 4, most: int = 16) -> int:
    """How many distinct copies of a call's operands (nbytes) time_call should cycle through: enough
    that together they are twice the L2 (each call reads its own from HBM), and at least `least`
    so that the graph's launch is spread over several calls."""
    if not device.startswith("cuda"):
        return 1
    l2 = torch.cuda.get_device_properties(torch.device(device)).L2_cache_size
    return max(least, min(most, math.ceil(2 * l2 / max(1, nbytes))))


def _time_cuda_graph(fn: Callable[[], Any], repeats: int) -> float:
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compilation, autotuning) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:  # the call reads device values on the host
        return triton.testing.do_bench(fn, warmup=10, rep=max(20, repeats), return_mode="median") / 1000.0
    flush = torch.empty(64 * 2**20, dtype=torch.int32, device=torch.cuda.current_device())  # 256 MB > L2
    largest = torch.empty((), dtype=torch.int32, device=flush.device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        torch.amax(flush, dim=0, out=largest)  # read: L2 left holding clean lines
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in zip(starts, ends))
    return times[len(times) // 2] / 1000.0


# Pages of the shipped kv_cache's block size; the attention kernels take any page size from the cache's shape.
PAGE_SIZE = 16


def _paged(k: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous K [B, L, Hkv, D] as pages [B * ceil(L/page), page, Hkv, D] with sequential block tables."""
    b, length, hkv, d = k.shape
    pages = math.ceil(length / page)
    padded = torch.zeros(b, pages * page, hkv, d, dtype=k.dtype, device=k.device)
    padded[:, :length] = k
    tables = torch.arange(b * pages, dtype=torch.int32, device=k.device).view(b, pages)
    return padded.view(b * pages, page, hkv, d), tables


def bench_prefill(fa, shape: dict, dtype, device) -> list[Timing]:
    """Causal prefill two ways: fresh prompts over the step's own contiguous K/V (varlen_attention,
    what the engine runs when no sequence has a cached prefix) and through the paged cache
    (paged_prefill: prompt chunks after a cached prefix, prefix-cache hits)."""
    b, h, hkv, s, d = shape["batch"], shape["heads"], shape["kv_heads"], shape["seq"], shape["head_dim"]
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, s, h, d, dtype=dtype, device=device, generator=g)
    k = torch.randn(b, s, hkv, d, dtype=dtype, device=device, generator=g)
    v = torch.randn(b, s, hkv, d, dtype=dtype, device=device, generator=g)
    k_cache, tables = _paged(k, PAGE_SIZE)
    v_cache, _ = _paged(v, PAGE_SIZE)
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=device)
    lens = torch.full((b,), s, dtype=torch.int32, device=device)
    qf, kf, vf = q.reshape(b * s, h, d), k.reshape(b * s, hkv, d), v.reshape(b * s, hkv, d)
    # Milliseconds-long kernels, and prefill reads lengths back to the host: timed eagerly.
    contiguous = time_call(lambda: fa.varlen_attention(qf, kf, vf, cu, cu, causal=True), device, graph=False)
    paged = time_call(lambda: fa.paged_prefill(qf, k_cache, v_cache, tables, cu, lens, causal=True), device, graph=False)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    base = time_call(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=hkv != h), device,
                     graph=False)
    flops = 4 * b * h * s * s * d / 2  # causal: half of QK^T and PV
    shape_name = f"B{b} H{h}/{hkv} S{s} D{d}"
    # Softmax between the two products keeps attention below matmul peak: the ceiling is the best
    # attention torch has on this device (cuDNN on Hopper), timed just above.
    sdpa = (flops / base / 1e12, "torch SDPA, this run")
    return [Timing("attention prefill (causal, contiguous K/V)", shape_name, "TFLOP/s", flops, contiguous,
                   "torch SDPA", base, *sdpa),
            Timing("attention prefill (causal, paged K/V)", f"{shape_name} page{PAGE_SIZE}", "TFLOP/s", flops, paged,
                   "torch SDPA", base, *sdpa)]


def bench_decode(fa, shape: dict, dtype, device) -> Timing:
    b, h, hkv, n, d = shape["batch"], shape["heads"], shape["kv_heads"], shape["kv_len"], shape["head_dim"]
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, h, d, dtype=dtype, device=device, generator=g)
    k = torch.randn(b, n, hkv, d, dtype=dtype, device=device, generator=g)
    v = torch.randn(b, n, hkv, d, dtype=dtype, device=device, generator=g)
    k_cache, tables = _paged(k, PAGE_SIZE)
    v_cache, _ = _paged(v, PAGE_SIZE)
    lens = torch.full((b,), n, dtype=torch.int32, device=device)
    # fixed, as the engine's CUDA graph for b sequences runs it (nothing read back to the host)
    splits = splits_for_batch(fa.num_splits_for(n), b, hkv, num_sms(device))
    ours = time_call(lambda: fa.paged_decode(q, k_cache, v_cache, tables, lens, num_splits=splits), device)
    qt, kt, vt = q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2)
    base = time_call(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=hkv != h), device)
    kv_bytes = 2 * b * n * hkv * d * k.element_size()
    # Decode reads the KV once: memory-bound, so the ceiling is the copy bandwidth.
    return Timing("attention decode (paged)", f"B{b} H{h}/{hkv} KV{n} D{d} page{PAGE_SIZE}", "TB/s", kv_bytes,
                  ours, "torch SDPA (contiguous KV)", base, *copy_ceiling(device, dtype))


def torch_int4_linear(weight: torch.Tensor, group_size: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torch's own int4 kernel (tinygemm's _weight_int4pack_mm, which gpt-fast uses) over an
    asymmetric group-wise RTN of `weight` [n, k]; None where this torch or device has none."""
    try:
        n, k = weight.shape
        groups = weight.float().reshape(n, k // group_size, group_size)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = (high - low).clamp(min=1e-6) / 15
        codes = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        packed = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
        # tinygemm's zero is the value of code 8: w = (code - 8) * scale + zero
        scales_zeros = torch.stack([scale.reshape(n, -1), (low + 8 * scale).reshape(n, -1)], dim=2)
        scales_zeros = scales_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)
        fn = lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scales_zeros)  # noqa: E731
        fn(torch.zeros(1, k, dtype=torch.bfloat16, device=weight.device))
        return fn
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


def bench_quant_linear(quant, shape: dict, dtype, device, name: str) -> list[Timing]:
    """The quantized linear against a dense matmul, and for 4 bits against torch's int4 kernel
    where this torch has one for the device (bf16 only); each timed over distinct copies of its
    weight (operand_copies), as a model's layers are."""
    m, k, n = shape["m"], shape["k"], shape["n"]
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n, bias=False, dtype=dtype, device=device)
    qlinear = quant.QuantLinear.from_linear(linear)  # in the compute dtype serving gives it (bf16 for a float32 model)
    qw = qlinear.quantized_weight()
    packed = sum(t.numel() * t.element_size() for t in (qw.qweight, qw.scales, qw.zeros) if t is not None)
    copies = operand_copies(packed, device)
    qlinears = [qlinear] + [quant.QuantLinear.from_linear(linear) for _ in range(copies - 1)]
    weights = [linear.weight] + [linear.weight.clone() for _ in range(copies - 1)]
    x = torch.randn(m, k, dtype=dtype, device=device)
    ours = time_call([lambda q=q: q(x) for q in qlinears], device)
    baselines = [(f"torch {str(dtype).split('.')[-1]} matmul", time_call([lambda w=w: F.linear(x, w) for w in weights], device))]
    if quant.BITS == 4 and dtype == torch.bfloat16 and device.startswith("cuda"):
        int4 = [torch_int4_linear(linear.weight, quant.GROUP_SIZE) for _ in range(copies)]
        if int4[0] is not None:
            baselines.append((f"torch int4 (tinygemm, group {quant.GROUP_SIZE})",
                              time_call([lambda f=f: f(x) for f in int4], device)))
    label, shape_name = f"{name} (int{quant.BITS}, group {quant.GROUP_SIZE})", f"{m}x{k} @ {k}x{n}"
    if m <= 16:  # memory-bound: rate is the packed weight (+ scales) read
        return [Timing(label, shape_name, "TB/s", packed, ours, base, seconds, *copy_ceiling(device, dtype))
                for base, seconds in baselines]
    dense = measure_ceilings(device, dtype)
    matmul = (dense.matmul_tflop_s, f"{dense.dtype} matmul, this run")
    return [Timing(label, shape_name, "TFLOP/s", 2 * m * k * n, ours, base, seconds, *matmul)
            for base, seconds in baselines]


def bench_kv_write(kv, block_size: int, shape: dict, dtype, device) -> Timing:
    t, hkv, d = shape["tokens"], shape["kv_heads"], shape["head_dim"]
    blocks = math.ceil(t / block_size) * 2
    cache = kv.PagedKVCache(1, blocks, hkv, d, dtype=dtype, device=device, block_size=block_size)
    g = torch.Generator(device=device).manual_seed(0)
    k = torch.randn(t, hkv, d, dtype=dtype, device=device, generator=g)
    v = torch.randn(t, hkv, d, dtype=dtype, device=device, generator=g)
    slots = torch.randperm(blocks * block_size, device=device, generator=g)[:t]
    ours = time_call(lambda: cache.write(0, k, v, slots), device)
    flat_k = cache.k_pages[0].data.view(-1, hkv, d)
    flat_v = cache.v_pages[0].data.view(-1, hkv, d)

    def torch_write():
        flat_k.index_copy_(0, slots, k.to(flat_k.dtype))
        flat_v.index_copy_(0, slots, v.to(flat_v.dtype))

    base = time_call(torch_write, device)
    moved = 2 * (k.numel() * k.element_size() + k.numel() * flat_k.element_size())  # K and V: read + written
    return Timing(f"kv write ({str(cache.storage_dtype).split('.')[-1]} pages)", f"T{t} Hkv{hkv} D{d}", "TB/s", moved,
                  ours, "torch index_copy_", base, *copy_ceiling(device, dtype))


def copy_ceiling(device: str, dtype) -> tuple[float, str]:
    return measure_ceilings(device, dtype).copy_tb_s, "copy, this run"


def plot_kernels(rows: list[dict[str, Any]], path, title: str):
    import numpy as np

    from vibee.bench.plot import figure, save

    fig, ax = figure(figsize=(9, 4.5))
    x = np.arange(len(rows))
    # Each kernel's rate as a fraction of its ceiling.
    ours = [(r["vibee_rate"] / r["ceiling"]) if r["ceiling"] else 0 for r in rows]
    base = [(r["baseline_rate"] / r["ceiling"]) if r["ceiling"] and r["baseline_rate"] else 0 for r in rows]
    ax.bar(x - 0.2, ours, 0.4, label="vibee (generated)")
    ax.bar(x + 0.2, base, 0.4, label="torch counterpart")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(x, [f"{r['kernel'].split(' (')[0]}\nvs {r['baseline'].split(' (')[0]}" for r in rows], fontsize=8)
    ax.set_ylabel("fraction of the ceiling measured in this run")
    ax.legend()
    return save(fig, path, title)
