"""A model's layers over the ranks of a tensor-parallel group: the generated parallel layers
(tensor_parallel spec) swapped in by the spec's sharding plan, the merged projections split
part by part, and the attention of each rank over its own heads.

Each rank builds the whole model from the checkpoint, then shard_model keeps its shard of every
sharded layer: q/k/v by heads (a copy of one KV head per rank where there are fewer KV heads
than ranks), gate/up by rows, o/down by input features (their partial sums all-reduced), the
embedding by vocabulary rows and lm_head by vocabulary rows, gathered back to full logits.
Quantized layers are cut after quantization, codes and scales alike (quantized_shards.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vibee.kinds.tensor_parallel.config import merged_parts
from vibee.runtime.attention import AttentionBackend
from vibee.runtime.quantized_shards import shard_quantized


@dataclass(frozen=True)
class RankShape:
    """What one rank computes of the model: its query and KV heads (its KV cache holds the latter)."""

    tp_rank: int
    tp_size: int
    num_heads: int
    num_kv_heads: int


def rank_heads(num_heads: int, num_kv_heads: int, tp_size: int) -> tuple[int, int]:
    """(query heads, KV heads) of one rank; ValueError when the heads do not split over tp_size."""
    if num_heads % tp_size:
        raise ValueError(f"{num_heads} attention heads do not split over --tensor-parallel-size {tp_size}")
    if num_kv_heads % tp_size == 0:
        return num_heads // tp_size, num_kv_heads // tp_size
    if tp_size % num_kv_heads == 0:  # fewer KV heads than ranks: each rank a copy of the one its queries read
        return num_heads // tp_size, 1
    raise ValueError(f"{num_kv_heads} KV heads do not split over --tensor-parallel-size {tp_size} (nor it over them)")


def _paired(sharding: dict[str, str], tp: Any, fan_out: str, fan_in: str, names: list[str]) -> bool:
    """Whether the plan shards the fan-out projection column-wise and its fan-in twin row-wise
    (both, or neither: anything else leaves a layer's input or output split in the wrong way)."""
    pairs = [(tp.shard_plan_for(name, sharding), tp.shard_plan_for(name.replace(fan_out, fan_in), sharding))
             for name in names]
    for name, (out_style, in_style) in zip(names, pairs):
        if (out_style, in_style) not in (("column", "row"), ("replicated", "replicated")):
            raise ValueError(f"the sharding plan makes {name} {out_style!r} and its {fan_in} {in_style!r}: "
                             f"shard {fan_out} column and {fan_in} row, or leave both replicated")
    split = {out_style == "column" for out_style, _ in pairs}
    if len(split) > 1:
        raise ValueError(f"the sharding plan splits {fan_out} in some layers and not in others; shard every layer alike")
    return split == {True}


def shard_model(model: Any, tp: Any, tp_rank: int, tp_size: int, group: Any, *, sharding: dict[str, str],
                gather_output: list[str], quant: Any = None) -> RankShape:
    """Swap model's layers for this rank's parallel twins (tp: the generated tensor_parallel
    module; quant: the generated quantization module, whose QuantLinears are cut the same way)
    and point its attention at this rank's heads. Returns what the rank computes."""
    config = model.config
    layers = model.model.layers
    qkv = [f"model.layers.{i}.self_attn.qkv_proj" for i in range(len(layers))]
    gate_up = [f"model.layers.{i}.mlp.gate_up_proj" for i in range(len(layers))]
    heads_split = _paired(sharding, tp, "qkv_proj", "o_proj", qkv)
    _paired(sharding, tp, "gate_up_proj", "down_proj", gate_up)
    if tp.shard_plan_for("lm_head", sharding) == "column" and "lm_head" not in gather_output:
        raise ValueError("the sharding plan splits lm_head by vocabulary without gather_output: [lm_head]; "
                         "every rank samples from the full logits")
    num_heads, num_kv_heads = (rank_heads(config.num_heads, config.num_kv_heads, tp_size) if heads_split
                               else (config.num_heads, config.num_kv_heads))
    parts = merged_parts(config)
    if quant is not None:
        shard_quantized(model, tp, quant, tp_rank, tp_size, group, sharding=sharding, gather_output=gather_output,
                        parts=parts)
    tp.parallelize(model, tp_rank, tp_size, group, sharding=sharding, gather_output=gather_output, parts=parts)
    d = config.head_dim
    for layer in layers:
        attn = layer.self_attn
        attn.num_heads, attn.num_kv_heads = num_heads, num_kv_heads
        attn.split_sizes = (num_heads * d, num_kv_heads * d, num_kv_heads * d)
    old = model.attention
    model.attention = AttentionBackend(old.fa, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=d,
                                       scale=old.scale, variants=old.variants, fuse_kv_store=old.fuse_kv_store)
    return RankShape(tp_rank, tp_size, num_heads, num_kv_heads)
