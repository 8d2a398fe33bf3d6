"""`vibee profile`'s measurement: one decode (or prefill) step of the model runner, kernel by kernel.

The step runs eagerly under torch.profiler with every piece of the model's work in a named scope
(a profiler range that counts the least work it must do: profile_scopes.py). A kernel belongs
to the innermost scope open when it was launched; its time is the profiler's (CUDA kernel time on a GPU, the ops' own CPU time on a CPU).
Scopes are named by module path with the layer index folded (`layers.*.self_attn.qkv_proj`), so a
row is one kind of work summed over the layers.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from vibee.bench.profile_scopes import SCOPE_PREFIX, ScopeWork, Tally, _nbytes, _scope, counted_scopes

OTHER = "(outside the scopes)"


@dataclass
class KernelTime:
    scope: str
    kernel: str
    launches: int
    seconds: float


def attribute(prof, device_kind: str) -> tuple[list[KernelTime], float]:
    """(time per (scope, kernel), total kernel time) from a finished torch.profiler run. CUDA: a
    kernel (or copy) goes to the innermost scope open when the host launched it: its launch is the
    runtime or driver call of the same correlation id (Triton's launches are driver calls that
    torch links to no op, so the op tree cannot say); launches outside every scope go to OTHER.
    (First H200 run of the GPU test: the scopes' GPU annotations counted as kernels, 70% "outside".)
    CPU: each op's own time, to its innermost scope."""
    events = prof.events()
    cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    times: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0])
    if device_kind == "cuda":
        ranges = sorted((e.time_range.start, e.time_range.end, e.name[len(SCOPE_PREFIX):])
                        for e in cpu if e.name.startswith(SCOPE_PREFIX))
        starts = [r[0] for r in ranges]
        # The CUDA runtime's and driver's calls (cudaLaunchKernel, cuLaunchKernelEx, cudaMemcpyAsync):
        # their ids are CUPTI correlation ids, shared with the device activity they started.
        launched_at = {e.id: e.time_range.start for e in cpu if e.name.startswith("cu")}

        def scope_at(t: float | None) -> str:
            if t is None:
                return OTHER
            # Scopes nest: the innermost one holding t is the latest-starting one that holds it.
            for begin, end, name in reversed(ranges[:bisect.bisect_right(starts, t)]):
                if end >= t:
                    return name
            return OTHER

        total = 0.0
        for e in events:
            # The scopes' ranges appear on the GPU's timeline too (user annotations): no kernels.
            if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation:
                us = e.time_range.elapsed_us()
                slot = times[(scope_at(launched_at.get(e.id)), e.name)]
                slot[0] += 1
                slot[1] += us
                total += us
    else:
        def scope_of(evt) -> str:
            while evt is not None:
                if evt.name.startswith(SCOPE_PREFIX):
                    return evt.name[len(SCOPE_PREFIX):]
                evt = evt.cpu_parent
            return OTHER

        total = 0.0
        for evt in cpu:
            if evt.name.startswith(SCOPE_PREFIX) or evt.self_cpu_time_total <= 0:
                continue
            slot = times[(scope_of(evt), evt.name)]
            slot[0] += 1
            slot[1] += evt.self_cpu_time_total
            total += evt.self_cpu_time_total
    kernels = [KernelTime(scope, kernel, n, us / 1e6) for (scope, kernel), (n, us) in times.items()]
    return kernels, total / 1e6


@dataclass
class StepProfile:
    """One decode step, averaged over the profiled steps."""
    kernels: list[KernelTime]  # per step
    work: dict[str, ScopeWork]  # per step
    kernel_seconds: float  # every kernel's time in a step, summed
    steps: int
    order: list[str]  # scopes in the order the step first entered them

    def scopes(self) -> list[str]:
        seen = dict.fromkeys(self.order)
        for k in self.kernels:
            seen.setdefault(k.scope, None)
        return list(seen)


def profile_step(model: nn.Module, kv_module: Any, *, batch_size: int, context_len: int, device: str,
                 block_size: int, phase: str = "decode", num_kv_heads: int | None = None, steps: int = 3,
                 warmup_steps: int = 2, num_splits: int | None = None,
                 on_step: Callable[[], None] | None = None) -> StepProfile:
    """Profile `steps` steps of `phase` after warmup_steps untimed ones (the kernels compile), eager
    (each launch is seen with its scope); returns the per-step averages.
    decode: prefill batch_size prompts of context_len - warmup_steps - 1 random tokens, then greedy
    decode steps, so that the first profiled one reads context_len tokens of KV per sequence.
    prefill: every step prefills batch_size fresh prompts of context_len tokens (and samples the
    last position's token), as a step that admits them does.
    num_splits: the decode attention's fixed KV split count, as the engine's CUDA graphs pass it
    (None: chosen per call from the lengths, which reads them back)."""
    from torch.profiler import ProfilerActivity, profile

    from vibee.runtime.attention import make_attention_batch
    from vibee.runtime.sampling_kernel import argmax_rows

    if phase not in ("decode", "prefill"):
        raise ValueError(f"phase must be decode or prefill, got {phase!r}")
    cfg = model.config
    prompt_len = context_len - warmup_steps - 1 if phase == "decode" else context_len
    if prompt_len < 1:
        raise ValueError(f"--context-len {context_len} leaves no prompt before {warmup_steps} warm-up steps")
    blocks_per_seq = math.ceil((context_len + steps) / block_size)
    cache = kv_module.PagedKVCache(cfg.num_layers, batch_size * blocks_per_seq, num_kv_heads or cfg.num_kv_heads,
                                   cfg.head_dim, dtype=model.dtype, device=device, block_size=block_size)
    tables = [list(range(s * blocks_per_seq, (s + 1) * blocks_per_seq)) for s in range(batch_size)]
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch_size * prompt_len,), generator=g).to(device)
    last = torch.arange(1, batch_size + 1, device=device) * prompt_len - 1
    tally = Tally()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    prof = profile(activities=activities)

    def sample(hidden: torch.Tensor) -> torch.Tensor:
        logits = model.compute_logits(hidden)
        with _scope("argmax"):
            tally.add("argmax", _nbytes(logits), 0)
            return argmax_rows(logits)  # the engine's (torch's one-row argmax took 27 us at batch 1)

    def prefill() -> torch.Tensor:
        batch = make_attention_batch([prompt_len] * batch_size, [prompt_len] * batch_size, tables, block_size, device)
        return sample(model(ids, batch.positions(), batch, cache)[last])

    with torch.inference_mode(), counted_scopes(model, tally):
        tokens = prefill() if phase == "decode" else None
        length = prompt_len
        for step in range(warmup_steps + steps):
            if step == warmup_steps:
                _sync(device)
                tally.counting = True
                prof.start()
            if phase == "prefill":
                prefill()
            else:
                length += 1
                batch = make_attention_batch([1] * batch_size, [length] * batch_size, tables, block_size, device)
                batch.num_splits = num_splits
                tokens = sample(model(tokens, batch.positions(), batch, cache))
            _sync(device)
            if on_step:
                on_step()
        prof.stop()
    kernels, total = attribute(prof, "cuda" if device.startswith("cuda") else "cpu")
    work = {scope: ScopeWork(w.calls // steps, w.bytes // steps, w.flops // steps) for scope, w in tally.work.items()}
    per_step = [KernelTime(k.scope, k.kernel, round(k.launches / steps), k.seconds / steps) for k in kernels]
    return StepProfile(per_step, work, total / steps, steps, list(tally.work))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class ScopeRow:
    scope: str
    calls: int
    kernels: int  # launches per step
    seconds: float
    bytes: int
    flops: int
    limit_seconds: float  # the scope's work at the ceilings: max(bytes / bandwidth, FLOPs / compute)
    bound: str  # "memory" or "compute": which ceiling sets the limit

    @property
    def fraction(self) -> float | None:
        return self.limit_seconds / self.seconds if self.seconds > 0 else None


def scope_rows(p: StepProfile, bandwidth_bytes_s: float, flops_s: float) -> list[ScopeRow]:
    """One row per scope: its kernels' time, its work and the share of its limit it reached."""
    seconds, launches = defaultdict(float), defaultdict(int)
    for k in p.kernels:
        seconds[k.scope] += k.seconds
        launches[k.scope] += k.launches
    rows = []
    for scope in p.scopes():
        w = p.work.get(scope, ScopeWork())
        memory_s, compute_s = w.bytes / bandwidth_bytes_s, w.flops / flops_s
        rows.append(ScopeRow(scope, w.calls, launches[scope], seconds[scope], w.bytes, w.flops,
                             max(memory_s, compute_s), "compute" if compute_s > memory_s else "memory"))
    return rows
