"""`vibee profile`'s measurement: one decode step of the model runner, kernel by kernel.

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

    def linear(x, weight, bias=None):
        scope = owner(weight, "linear")
        tally.add(scope, _nbytes(x, weight, bias) + x.numel() // weight.shape[1] * weight.shape[0] * x.element_size(),
                  _linear_flops(x, weight.shape[1], weight.shape[0]))
        with _scope(scope):
            return originals["linear"](x, weight, bias)

    def silu_mul_linear(gate_up, weight, bias=None):
        scope = owner(weight, "silu_mul_linear") + " (+ silu*mul)"
        rows = gate_up.numel() // gate_up.shape[-1]
        tally.add(scope, _nbytes(gate_up, weight, bias) + rows * weight.shape[0] * gate_up.element_size(),
                  2 * rows * weight.shape[1] * weight.shape[0])
        with _scope(scope):
            return originals["silu_mul_linear"](gate_up, weight, bias)

    def rms_norm(x, weight, eps, residual=None):
        scope = owner(weight, "rms_norm")
        # x (and the residual) read, the output (and the new residual) written, the weight read.
        tally.add(scope, 2 * _nbytes(x) + 2 * _nbytes(residual) + _nbytes(weight), 0)
        with _scope(scope):
            return originals["rms_norm"](x, weight, eps, residual)

    def apply_rope_qk(q, k, *args, **kw):
        tally.add("layers.*.self_attn.rope", 2 * _nbytes(q, k), 0)
        with _scope("layers.*.self_attn.rope"):
            return originals["apply_rope_qk"](q, k, *args, **kw)

    def silu_mul(gate, up):
        scope = "layers.*.mlp.silu_mul"
        tally.add(scope, 3 * _nbytes(gate), 0)
        with _scope(scope):
            return originals["silu_mul"](gate, up)

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

    for module in model.modules():
        layer_like = hasattr(module, "in_features") and hasattr(module, "out_features") and type(module) is not nn.Linear
        if isinstance(module, nn.Embedding) or layer_like:
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
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


@dataclass
class KernelTime:
    scope: str
    kernel: str
    launches: int
    seconds: float


def attribute(prof, device_kind: str) -> tuple[list[KernelTime], float]:
    """(time per (scope, kernel), total kernel time) from a finished torch.profiler run. CUDA: each
    kernel's time goes to the innermost scope around the op that launched it; kernels of no scope
    (copies, memsets) go to OTHER. CPU: each op's own time, to its innermost scope."""
    events = prof.events()

    def scope_of(evt) -> str:
        while evt is not None:
            if evt.name.startswith(SCOPE_PREFIX):
                return evt.name[len(SCOPE_PREFIX):]
            evt = evt.cpu_parent
        return OTHER

    times: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0])
    if device_kind == "cuda":
        total = sum(e.time_range.elapsed_us() for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        for evt in events:
            if evt.device_type != torch.autograd.DeviceType.CPU:
                continue
            for k in evt.kernels:
                slot = times[(scope_of(evt), k.name)]
                slot[0] += 1
                slot[1] += k.duration
        attributed = sum(v[1] for v in times.values())
        if total - attributed > 0.5:  # microseconds
            times[(OTHER, "(kernels not linked to an op)")] = [0, total - attributed]
    else:
        total = 0.0
        for evt in events:
            if evt.device_type != torch.autograd.DeviceType.CPU or evt.name.startswith(SCOPE_PREFIX):
                continue
            if evt.self_cpu_time_total > 0:
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


def profile_decode(model: nn.Module, kv_module: Any, *, batch_size: int, context_len: int, device: str,
                   block_size: int, num_kv_heads: int | None = None, steps: int = 3, warmup_steps: int = 2,
                   on_step: Callable[[], None] | None = None) -> StepProfile:
    """Prefill batch_size prompts of context_len - warmup_steps - 1 random tokens, decode
    warmup_steps steps untimed (the kernels compile), then profile `steps` greedy decode steps
    (eager: each launch is seen with its scope). Returns the per-step averages."""
    from torch.profiler import ProfilerActivity, profile

    from vibee.runtime.attention import make_attention_batch

    cfg = model.config
    prompt_len = context_len - warmup_steps - 1
    if prompt_len < 1:
        raise ValueError(f"--context-len {context_len} leaves no prompt before {warmup_steps} warm-up steps")
    total = context_len + steps
    blocks_per_seq = math.ceil(total / block_size)
    cache = kv_module.PagedKVCache(cfg.num_layers, batch_size * blocks_per_seq, num_kv_heads or cfg.num_kv_heads,
                                   cfg.head_dim, dtype=model.dtype, device=device, block_size=block_size)
    tables = [list(range(s * blocks_per_seq, (s + 1) * blocks_per_seq)) for s in range(batch_size)]
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch_size * prompt_len,), generator=g).to(device)
    tally = Tally()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    prof = profile(activities=activities)
    with torch.inference_mode(), counted_scopes(model, tally):
        batch = make_attention_batch([prompt_len] * batch_size, [prompt_len] * batch_size, tables, block_size, device)
        hidden = model(ids, batch.positions(), batch, cache)
        last = torch.arange(1, batch_size + 1, device=device) * prompt_len - 1
        tokens = model.compute_logits(hidden[last]).argmax(dim=-1)
        length = prompt_len
        for step in range(warmup_steps + steps):
            length += 1
            if step == warmup_steps:
                _sync(device)
                tally.counting = True
                prof.start()
            batch = make_attention_batch([1] * batch_size, [length] * batch_size, tables, block_size, device)
            hidden = model(tokens, batch.positions(), batch, cache)
            logits = model.compute_logits(hidden)
            with _scope("argmax"):
                tally.add("argmax", _nbytes(logits), 0)
                tokens = logits.argmax(dim=-1)
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
