"""Contracts between specs generated together: values that must agree across modules.

Each check runs only when the specs it relates are present, and reports at the value to change."""

from __future__ import annotations

from vibee.ir.spec import Spec
from vibee.frontend.errors import Diagnostic


def check_contracts(specs: list[Spec]) -> list[Diagnostic]:
    by_kind = {s.kind: s for s in specs}
    return [d for check in CHECKS for d in check(by_kind)]


def _at(spec: Spec, key: str):
    return spec.config_spans.get(key, spec.span)


def _cache_head_dim_is_compiled(by_kind: dict[str, Spec]) -> list[Diagnostic]:
    """Attention is specialised per head dim; the cached model's head dim must be one of them."""
    kv, attn = by_kind.get("kv_cache"), by_kind.get("flash_attention")
    if not (kv and attn) or kv.config.model.head_dim in attn.config.head_dims:
        return []
    d = kv.config.model.head_dim
    return [Diagnostic(f"kv_cache model head_dim {d} is not among flash_attention head_dims {list(attn.config.head_dims)}",
                       _at(attn, "head_dims"), f"add {d} to head_dims, or change model.head_dim in {kv.path}")]


def _group_size_divides_shards(by_kind: dict[str, Spec]) -> list[Diagnostic]:
    """Row-parallel layers split their input features across ranks; a quantization group may not
    straddle two ranks, so each rank's slice must be a whole number of groups."""
    quant, tp = by_kind.get("quantization"), by_kind.get("tensor_parallel")
    if not (quant and tp) or quant.config.group_size <= 0:
        return []
    g, n, m = quant.config.group_size, tp.config.tp_size, tp.config.model
    out = []
    for name, features in (("hidden_size", m.hidden_size), ("intermediate_size", m.intermediate_size)):
        shard = features // n
        if shard % g:
            out.append(Diagnostic(
                f"quantization group_size {g} does not divide the tensor-parallel shard of {name} ({features} / tp_size {n} = {shard})",
                _at(quant, "group_size"), f"use a group_size that divides {shard}, or change tp_size in {tp.path}"))
    return out


def _same_model_shape(by_kind: dict[str, Spec]) -> list[Diagnostic]:
    """kv_cache and tensor_parallel both describe the served model; they must describe the same one."""
    kv, tp = by_kind.get("kv_cache"), by_kind.get("tensor_parallel")
    if not (kv and tp):
        return []
    a, b = kv.config.model, tp.config.model
    pairs = [
        ("num_layers", a.num_layers, b.num_layers),
        ("num_kv_heads", a.num_kv_heads, b.num_kv_heads),
        ("head_dim", a.head_dim, b.hidden_size // b.num_heads),
    ]
    return [Diagnostic(f"kv_cache model.{name} is {x} but tensor_parallel's model has {y} ({tp.path})",
                       _at(kv, f"model.{name}"), "describe the same model in both specs")
            for name, x, y in pairs if x != y]


CHECKS = [_cache_head_dim_is_compiled, _group_size_divides_shards, _same_model_shape]
