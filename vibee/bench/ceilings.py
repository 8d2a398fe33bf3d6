"""What the device under a benchmark can do, measured in the running process: memory bandwidth
(a device-to-device copy) and dense matmul throughput in the benchmark's dtype. Both take well
under a second, so benchmarks report against this run's machine instead of carrying one
machine's numbers. Measured once per process for each (device, dtype).
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

# CUDA: large enough to miss the L2 (60 MB on an H200) by far and reach full HBM bandwidth.
# CPU: past a typical last-level cache, still a few milliseconds to copy.
COPY_BYTES = {"cuda": 2**30, "cpu": 32 * 2**20}
MATMUL_SIZE = {"cuda": 8192, "cpu": 256}
WARMUP, REPEATS = 2, 10


@dataclass(frozen=True)
class Ceilings:
    device_name: str
    dtype: str
    copy_tb_s: float  # bytes read + written per second, / 1e12
    matmul_tflop_s: float
    how: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_ceilings(device: str, dtype: torch.dtype) -> Ceilings:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _measure(str(dev), dtype)


@functools.cache
def _measure(device: str, dtype: torch.dtype) -> Ceilings:
    kind = "cuda" if device.startswith("cuda") else "cpu"
    # cuBLAS's workspace, which torch keeps for the process, gets a segment of its own here rather
    # than one carved from the copy buffers, which would then stay reserved after empty_cache.
    _matmul_seconds(device, dtype, 16)
    copy_s = _copy_seconds(device, COPY_BYTES[kind])
    n = MATMUL_SIZE[kind]
    matmul_s = _matmul_seconds(device, dtype, n)
    if kind == "cuda":
        torch.cuda.empty_cache()  # hand the buffers back before the benchmark allocates its own
    dtype_name = str(dtype).split(".")[-1]
    timer = "CUDA events" if kind == "cuda" else "time.perf_counter"
    how = (f"device-to-device copy of {COPY_BYTES[kind] // 2**20} MiB (bytes read + written) and a {dtype_name} "
           f"{n}x{n}x{n} matmul, each the best of {REPEATS} after {WARMUP} warm-up calls ({timer})")
    name = torch.cuda.get_device_name(device) if kind == "cuda" else "cpu"
    return Ceilings(device_name=name, dtype=dtype_name, copy_tb_s=2 * COPY_BYTES[kind] / copy_s / 1e12,
                    matmul_tflop_s=2 * n**3 / matmul_s / 1e12, how=how)


def _copy_seconds(device: str, nbytes: int) -> float:
    src = torch.randn(nbytes // 4, device=device)  # float32: the copy's dtype does not change its bytes
    dst = torch.empty_like(src)
    return _best_seconds(lambda: dst.copy_(src), device)


def _matmul_seconds(device: str, dtype: torch.dtype, n: int) -> float:
    # Random operands: zeros would let the GPU run cooler and faster than real weights allow.
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, dtype=dtype, device=device)
    return _best_seconds(lambda: torch.matmul(a, b, out=out), device)


def _best_seconds(fn: Callable[[], Any], device: str) -> float:
    """Shortest time of REPEATS calls after WARMUP: a ceiling is the fastest the device was seen to
    go, and whatever else disturbs a call (clocks ramping, another process) only slows it."""
    for _ in range(WARMUP):
        fn()
    if not device.startswith("cuda"):
        times = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)
    with torch.cuda.device(device):
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(REPEATS)]
        for start, end in pairs:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return min(start.elapsed_time(end) for start, end in pairs) / 1000.0
