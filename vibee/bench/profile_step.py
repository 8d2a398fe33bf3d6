"""`vibee profile`'s measurement: one decode (or prefill) step of the model runner, kernel by kernel.

The step runs eagerly under torch.profiler with every piece of the model's work in a named scope
(a profiler range): the fused kernels' wrappers (vibee/runtime/fused.py), the quantized layers,
the attention call, the embedding and the argmax. Each scope also counts the work it must do,
from its arguments: bytes it has to move at the least (weights once, activations in and out, the
KV it reads and writes) and FLOPs. A kernel belongs to the innermost scope open when it was
launched; its time is the profiler's (CUDA kernel time on a GPU, the ops' own CPU time on a CPU).
Scopes are named by module path with the layer index folded (`layers.*.self_attn.qkv_proj`), so a
row is one kind of work summed over the layers.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

SCOPE_PREFIX = "vibee::"
OTHER = "(outside the scopes)"


@dataclass
class ScopeWork:
    calls: int = 0
    bytes: int = 0
    flops: int = 0


@dataclass
class Tally:
    """Work counted per scope while `counting` is on (the profiled steps only)."""
    work: dict[str, ScopeWork] = field(default_factory=lambda: defaultdict(ScopeWork))
    counting: bool = False

    def add(self, scope: str, nbytes: int, flops: int) -> None:
        if self.counting:
            w = self.work[scope]
            w.calls += 1
            w.bytes += int(nbytes)
            w.flops += int(flops)


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _storage_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (what a pass over its weight reads)."""
    return sum(_nbytes(t) for t in (*module.parameters(), *module.buffers()))


def fold_layer(path: str) -> str:
    """`model.layers.12.mlp.down_proj` -> `layers.*.mlp.down_proj`; `model.norm` -> `norm`."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", path.removeprefix("model."))


def _linear_flops(x: torch.Tensor, n_in: int, n_out: int) -> int:
    return 2 * (x.numel() // n_in) * n_in * n_out


@contextmanager
def _scope(name: str) -> Iterator[None]:
    with torch.profiler.record_function(SCOPE_PREFIX + name):
        yield


def attention_work(q_lens: list[int], seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
                   q_bytes: int, kv_bytes: int) -> tuple[int, int]:
    """(bytes, FLOPs) of one layer's attention over a batch: the new tokens' K/V written, every
    sequence's K/V read once, q read and the output written; QK^T and PV for each (query, key)
    pair a causal query sees (a sequence's n new tokens are its last of s)."""
    pairs = sum(n * s - n * (n - 1) // 2 for n, s in zip(q_lens, seq_lens))
    new = sum(q_lens)
    kv_row = 2 * num_kv_heads * head_dim * kv_bytes  # one token's K and V
    nbytes = new * kv_row + sum(seq_lens) * kv_row + 2 * new * num_heads * head_dim * q_bytes
    return nbytes, 4 * pairs * num_heads * head_dim


class _CountedAttention:
    """The model's attention backend, in a scope that counts its work (KV write + attention)."""

    def __init__(self, backend: Any, tally: Tally):
        self.backend, self.tally = backend, tally

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def __call__(self, layer, q, k, v, batch, kv_cache, **kw):
        if self.tally.counting:
            q_lens = np.diff(np.asarray(batch.cu_seqlens_q_host if batch.cu_seqlens_q_host is not None
                                        else batch.cu_seqlens_q.tolist())).tolist()
            seq_lens = list(batch.seq_lens_host) if batch.seq_lens_host is not None else batch.seq_lens.tolist()
            kv_elt = kv_cache.k_pages[layer].data.element_size() if kv_cache is not None else k.element_size()
            nbytes, flops = attention_work(q_lens, seq_lens, q.shape[1], k.shape[1], q.shape[2], q.element_size(), kv_elt)
            self.tally.add("layers.*.self_attn.attention", nbytes, flops)
        with _scope("layers.*.self_attn.attention"):
            return self.backend(layer, q, k, v, batch, kv_cache, **kw)


@contextmanager
def counted_scopes(model: nn.Module, tally: Tally) -> Iterator[None]:
    """While open: the model's work runs in named profiler scopes and is counted into `tally`.
    The fused wrappers are swapped for counting ones (their weight names the layer), the quantized
    layers and the embedding get hooks, and the attention backend a counting wrapper; all is put
    back on exit."""
    from vibee.runtime import fused

    names = {}  # a weight's storage -> the folded path of the module that owns it
    for path, module in model.named_modules():
        for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            # A tied lm_head shares the embedding's weight: a linear layer names it.
            if type(module) is nn.Linear or t.data_ptr() not in names:
                names[t.data_ptr()] = fold_layer(path)

    def owner(weight: torch.Tensor, what: str) -> str:
        return names.get(weight.data_ptr(), what)

    depth = [0]

    def counted(name: str, scope: str, nbytes: Callable[[], int], flops: int, *args):
        """originals[name](*args) in its scope, its work counted; a call made inside another
        counted call (silu_mul_linear's own silu_mul) is part of the outer one's work and scope."""
        if depth[0]:
            return originals[name](*args)
        tally.add(scope, nbytes(), flops)
        depth[0] += 1
        try:
            with _scope(scope):
                return originals[name](*args)
        finally:
            depth[0] -= 1

    def linear(x, weight, bias=None):
        y_bytes = x.numel() // weight.shape[1] * weight.shape[0] * x.element_size()
        return counted("linear", owner(weight, "linear"), lambda: _nbytes(x, weight, bias) + y_bytes,
                       _linear_flops(x, weight.shape[1], weight.shape[0]), x, weight, bias)

    def silu_mul_linear(gate_up, weight, bias=None):
        # The least it moves: gate_up read once, the weight, the output (silu * up never stored).
        rows = gate_up.numel() // gate_up.shape[-1]
        return counted("silu_mul_linear", owner(weight, "silu_mul_linear") + " (+ silu*mul)",
                       lambda: _nbytes(gate_up, weight, bias) + rows * weight.shape[0] * gate_up.element_size(),
                       2 * rows * weight.shape[1] * weight.shape[0], gate_up, weight, bias)

    def rms_norm(x, weight, eps, residual=None):
        # x (and the residual) read, the output (and the new residual) written, the weight read.
        return counted("rms_norm", owner(weight, "rms_norm"),
                       lambda: 2 * _nbytes(x) + 2 * _nbytes(residual) + _nbytes(weight), 0, x, weight, eps, residual)

    def apply_rope_qk(q, k, *args):
        return counted("apply_rope_qk", "layers.*.self_attn.rope", lambda: 2 * _nbytes(q, k), 0, q, k, *args)

    def silu_mul(gate, up):
        return counted("silu_mul", "layers.*.mlp.silu_mul", lambda: 3 * _nbytes(gate), 0, gate, up)

    wrappers = {"linear": linear, "silu_mul_linear": silu_mul_linear, "rms_norm": rms_norm,
                "apply_rope_qk": apply_rope_qk, "silu_mul": silu_mul}
    originals = {name: getattr(fused, name) for name in wrappers}
    paths = {module: fold_layer(path) for path, module in model.named_modules()}
    handles = []

    def enter(module, args):
        scope = paths[module]
        x = args[0]
        if isinstance(module, nn.Embedding):
            tally.add(scope, _nbytes(x) + 2 * x.numel() * module.embedding_dim * module.weight.element_size(), 0)
        else:  # a quantized linear layer: its stored weight read once, x in, y out
            y_bytes = x.numel() // module.in_features * module.out_features * x.element_size()
            tally.add(scope, _storage_bytes(module) + _nbytes(x) + y_bytes,
                      _linear_flops(x, module.in_features, module.out_features))
        stack = ExitStack()
        stack.enter_context(_scope(scope))
        module._vibee_profile_scope = stack

    def leave(module, args, output):
        module.__dict__.pop("_vibee_profile_scope").close()

    def silu_mul_scoped(module):
        """A quantized layer's silu_mul_forward (its kernel takes gate_up whole: the model does not
        call the layer) in the layer's scope, counted as the bf16 path's silu_mul_linear is."""
        method = module.silu_mul_forward

        def silu_mul_forward(gate_up):
            scope = paths[module] + " (+ silu*mul)"
            with _scope(scope):
                y = method(gate_up)
            if y is not None:
                rows = gate_up.numel() // gate_up.shape[-1]
                tally.add(scope, _storage_bytes(module) + _nbytes(gate_up, y), 2 * rows * module.in_features * module.out_features)
            return y
        return silu_mul_forward

    scoped = []
    for module in model.modules():
        layer_like = hasattr(module, "in_features") and hasattr(module, "out_features") and type(module) is not nn.Linear
        if isinstance(module, nn.Embedding) or layer_like:
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
        if layer_like and callable(getattr(module, "silu_mul_forward", None)):
            module.silu_mul_forward = silu_mul_scoped(module)
            scoped.append(module)
    backend = model.attention
    try:
        for name, fn in wrappers.items():
            setattr(fused, name, fn)
        model.attention = _CountedAttention(backend, tally)
        yield
    finally:
        for name, fn in originals.items():
            setattr(fused, name, fn)
        model.attention = backend
        for h in handles:
            h.remove()
        for module in scoped:
            del module.silu_mul_forward  # the class's method again


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
