"""Quantized layers over tensor-parallel ranks: a QuantLinear's codes, scales and zero points cut
the way the spec's plan cuts a float layer, after quantization, so each rank computes exactly its
part of the unsharded quantized layer (tp = 1 and tp = N serve the same codes).

column: the output rows (a merged projection's rows part by part, as the generated
ColumnParallelLinear picks them), optionally all-gathered; row: the input features, whole groups
only (the group size must divide the shard's width: the error says which to choose), partial
sums all-reduced and the bias added once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vibee.kinds.tensor_parallel.config import matching_pattern


class QuantColumnShard(nn.Module):
    def __init__(self, local: nn.Module, *, gather: bool, tp_size: int, group: Any):
        super().__init__()
        self.local, self.gather, self.tp_size, self.group = local, gather, tp_size, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(x)
        if not self.gather:
            return y
        y = y.contiguous()
        pieces = [torch.empty_like(y) for _ in range(self.tp_size)]
        dist.all_gather(pieces, y, group=self.group)
        return torch.cat(pieces, dim=-1)


class QuantRowShard(nn.Module):
    def __init__(self, local: nn.Module, bias: torch.Tensor | None, *, group: Any):
        super().__init__()
        self.local, self.group = local, group
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(x)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


def _local_layer(layer: nn.Module, qw: Any, bias: torch.Tensor | None) -> nn.Module:
    """A QuantLinear of layer's type holding the shard qw."""
    out_features, in_features = qw.shape
    local = type(layer)(in_features, out_features, bias=bias is not None, device=layer.qweight.device,
                        dtype=layer.scales.dtype)
    local.load_quantized(qw)
    if bias is not None:
        with torch.no_grad():
            local.bias.copy_(bias)
    return local


def shard_quantized(model: nn.Module, tp: Any, quant: Any, tp_rank: int, tp_size: int, group: Any, *,
                    sharding: dict[str, str], gather_output: list[str], parts: dict[str, list[tuple[int, int]]]) -> None:
    """Swap every QuantLinear (quant: the generated quantization module) that the plan shards
    for this rank's shard of it; the float layers are left to tp.parallelize."""
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, quant.QuantLinear):
            continue
        style = tp.shard_plan_for(name, sharding)
        if style == "replicated":
            continue
        qw = layer.quantized_weight()
        out_features, in_features = qw.shape
        if style == "column":
            merged = matching_pattern(name, parts) if parts else None
            if merged is not None:
                rows = tp.column_rows(parts[merged], tp_rank, tp_size)
            else:
                if out_features % tp_size:
                    raise ValueError(f"{name}: {out_features} output features do not split over {tp_size} ranks")
                per = out_features // tp_size
                rows = list(range(tp_rank * per, (tp_rank + 1) * per))
            index = torch.tensor(rows, device=layer.qweight.device)
            bias = None if layer.bias is None else layer.bias.detach()[index]
            shard = QuantColumnShard(_local_layer(layer, qw.take_rows(index), bias),
                                     gather=tp.gathers_output(name, sharding, gather_output), tp_size=tp_size, group=group)
        elif style == "row":
            width = in_features // tp_size
            if in_features % tp_size or (qw.group_size != in_features and width % qw.group_size):
                fits = qw.group_size
                while fits > 1 and width % fits:
                    fits //= 2
                raise ValueError(f"{name}: its {in_features} input features in groups of {qw.group_size} do not split "
                                 f"into whole groups over {tp_size} ranks ({width} each): quantize with "
                                 f"--group-size {fits} (or another size that divides {width})")
            bias = None if layer.bias is None else layer.bias.detach().clone()
            shard = QuantRowShard(_local_layer(layer, qw.columns(tp_rank * width, (tp_rank + 1) * width), None), bias,
                                  group=group)
        else:
            raise ValueError(f"{name} is a quantized linear but the sharding plan says {style!r}; linears shard column or row")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, shard)
