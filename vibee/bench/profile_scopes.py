"""`vibee profile`'s scopes: the model's work in named profiler ranges, each counting the least it
must do. counted_scopes swaps the decoder ops (the generated decoder module's) for counting
ones, hooks the quantized layers and the embedding, and wraps the attention call; each scope
adds the bytes it has to move at the least (weights once, activations in and out, the KV it
reads and writes) and its FLOPs to a Tally. Scopes are named by module path with the layer index
folded (`layers.*.self_attn.qkv_proj`), so a row is one kind of work summed over the layers.
"""

from __future__ import annotations

import re
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

SCOPE_PREFIX = "vibee::"


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


def _kv_row_bytes(rope_target: dict) -> int:
    """The K and V rows a one-token QKV projection with RoPE's epilogue stores in the pages (rope_target:
    rope_forward's or rope_linear's keywords; none stored without them)."""
    if "k_pages" not in rope_target:
        return 0
    return 2 * rope_target["kv_heads"] * rope_target["head_dim"] * rope_target["k_pages"].element_size()


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
                   q_bytes: int, kv_bytes: int, write_kv: bool = True) -> tuple[int, int]:
    """(bytes, FLOPs) of one layer's attention over a batch: the new tokens' K/V written (unless
    RoPE's kernel stored them), every sequence's K/V read once, q read and the output written;
    QK^T and PV for each (query, key) pair a causal query sees (a sequence's n new tokens are its
    last of s)."""
    pairs = sum(n * s - n * (n - 1) // 2 for n, s in zip(q_lens, seq_lens))
    new = sum(q_lens)
    kv_row = 2 * num_kv_heads * head_dim * kv_bytes  # one token's K and V
    nbytes = new * kv_row * write_kv + sum(seq_lens) * kv_row + 2 * new * num_heads * head_dim * q_bytes
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
            nbytes, flops = attention_work(q_lens, seq_lens, q.shape[1], k.shape[1], q.shape[2], q.element_size(), kv_elt,
                                           write_kv=not kw.get("kv_written", False))
            self.tally.add("layers.*.self_attn.attention", nbytes, flops)
        with _scope("layers.*.self_attn.attention"):
            return self.backend(layer, q, k, v, batch, kv_cache, **kw)


@contextmanager
def counted_scopes(model: nn.Module, tally: Tally) -> Iterator[None]:
    """While open: the model's work runs in named profiler scopes and is counted into `tally`.
    The decoder module's ops are swapped for counting ones (their weight names the layer),
    the quantized layers and the embedding get hooks, and the attention backend a counting wrapper;
    all is put back on exit."""
    ops = model.ops

    names = {}  # a weight's storage -> the folded path of the module that owns it
    for path, module in model.named_modules():
        for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            # A tied lm_head shares the embedding's weight: a linear layer names it.
            if type(module) is nn.Linear or t.data_ptr() not in names:
                names[t.data_ptr()] = fold_layer(path)

    def owner(weight: torch.Tensor, what: str) -> str:
        return names.get(weight.data_ptr(), what)

    depth = [0]

    def counted(name: str, scope: str, nbytes: Callable[[], int], flops: int, *args, **kwargs):
        """originals[name](*args, **kwargs) in its scope, its work counted; a call made inside another
        counted call (linear_silu_mul's own linear and silu_mul) is part of the outer one's work and scope."""
        if depth[0]:
            return originals[name](*args, **kwargs)
        tally.add(scope, nbytes(), flops)
        depth[0] += 1
        try:
            with _scope(scope):
                return originals[name](*args, **kwargs)
        finally:
            depth[0] -= 1

    def linear(x, weight, bias=None):
        y_bytes = x.numel() // weight.shape[1] * weight.shape[0] * x.element_size()
        return counted("linear", owner(weight, "linear"), lambda: _nbytes(x, weight, bias) + y_bytes,
                       _linear_flops(x, weight.shape[1], weight.shape[0]), x, weight, bias)

    def linear_silu_mul(x, weight, bias=None):
        # The least it moves: x, the weight and silu(gate) * up written ([gate | up] never stored).
        rows = x.numel() // x.shape[-1]
        return counted("linear_silu_mul", owner(weight, "linear_silu_mul") + " (+ silu*mul)",
                       lambda: _nbytes(x, weight, bias) + rows * weight.shape[0] // 2 * x.element_size(),
                       _linear_flops(x, weight.shape[1], weight.shape[0]), x, weight, bias)

    def rms_norm(x, weight, eps, residual=None):
        # x (and the residual) read, the output (and the new residual) written, the weight read.
        return counted("rms_norm", owner(weight, "rms_norm"),
                       lambda: 2 * _nbytes(x) + 2 * _nbytes(residual) + _nbytes(weight), 0, x, weight, eps, residual)

    def apply_rope_qk(q, k, *args, kv_write=None):
        # q and k read and written; with kv_write also v read and the K/V rows stored in the pages
        scope = "layers.*.self_attn.rope" + ("" if kv_write is None else " (+ KV write)")
        kv = 0 if kv_write is None else _nbytes(kv_write.v) + 2 * k.numel() * kv_write.k_pages.element_size()
        return counted("apply_rope_qk", scope, lambda: 2 * _nbytes(q, k) + kv, 0, q, k, *args, kv_write=kv_write)

    def silu_mul(gate, up):
        return counted("silu_mul", "layers.*.mlp.silu_mul", lambda: 3 * _nbytes(gate), 0, gate, up)

    def rope_linear(x, weight, bias=None, **rope_target):
        # One token's QKV GEMV that rotates and stores K/V itself: counted only where it ran (None:
        # the model projects and rotates on, counted there). x, the weight and the row; the K/V rows.
        scope = owner(weight, "rope_linear") + " (+ rope, KV write)"
        with _scope(scope):
            out = originals["rope_linear"](x, weight, bias, **rope_target)
        if out is not None:
            tally.add(scope, _nbytes(x, weight, bias, out) + _kv_row_bytes(rope_target),
                      _linear_flops(x, weight.shape[1], weight.shape[0]))
        return out

    wrappers = {"linear": linear, "rms_norm": rms_norm,
                "apply_rope_qk": apply_rope_qk, "silu_mul": silu_mul, "rope_linear": rope_linear,
                "linear_silu_mul": linear_silu_mul}
    originals = {name: getattr(ops, name) for name in wrappers}
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

    def fused_scoped(module, name):
        """A quantized layer's fused forward (silu_mul_forward, rope_forward: the model calls the
        method, not the layer) in the layer's scope, its weight read once, its input read and its
        output written, counted as the bf16 path's fused ops are."""
        method = getattr(module, name)

        def forward(x, *args, **kwargs):
            scope = paths[module] + {"silu_mul_forward": " (+ silu*mul)", "rope_forward": " (+ rope, KV write)"}[name]
            with _scope(scope):
                out = method(x, *args, **kwargs)
            if out is not None:
                rows = x.numel() // x.shape[-1]
                written = rows * module.out_features * x.element_size() + _kv_row_bytes(kwargs)
                tally.add(scope, _storage_bytes(module) + _nbytes(x) + written, 2 * rows * module.in_features * module.out_features)
            return out
        return forward

    fused_methods = ("silu_mul_forward", "rope_forward")
    scoped = []
    for module in model.modules():
        layer_like = hasattr(module, "in_features") and hasattr(module, "out_features") and type(module) is not nn.Linear
        if isinstance(module, nn.Embedding) or layer_like:
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
        for name in fused_methods:
            if layer_like and callable(getattr(module, name, None)):
                setattr(module, name, fused_scoped(module, name))
                scoped.append((module, name))
    backend = model.attention
    try:
        for name, fn in wrappers.items():
            setattr(ops, name, fn)
        model.attention = _CountedAttention(backend, tally)
        yield
    finally:
        for name, fn in originals.items():
            setattr(ops, name, fn)
        model.attention = backend
        for h in handles:
            h.remove()
        for module, name in scoped:
            delattr(module, name)  # the class's method again
