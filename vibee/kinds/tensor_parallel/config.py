"""Config of the tensor_parallel kind: how many ranks share each layer, over which backend, and
which layers shard how (column, row, vocab or replicated). A spec describes no model: `vibee explain`
computes its figures for a model shape it is given, and a served model's dimensions are checked
against tp_size when it is loaded."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import ValidationInfo, field_validator

from vibee.ir.spec import KindConfig, knob

if TYPE_CHECKING:
    from vibee.runtime.model_config import ModelConfig

ShardStyle = Literal["column", "row", "vocab", "replicated"]

# Megatron-style plan for Llama-family decoders as vibee's model names their layers (q/k/v merged
# into qkv_proj, gate/up into gate_up_proj): the projections that fan out split their output
# features (a merged one part by part: each rank its heads of q, k and v, its half of gate and of
# up), the ones that fan back in (o, down) split their input features, so one all-reduce per
# attention block and one per MLP block brings the activations back whole.
LLAMA_SHARDING: dict[str, str] = {
    "qkv_proj": "column",
    "o_proj": "row",
    "gate_up_proj": "column",
    "down_proj": "row",
    "embed_tokens": "vocab",
    "lm_head": "column",
}

_PATTERN = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # config.json torch_dtype; bf16 when absent


def matching_pattern(name: str, patterns) -> str | None:
    """The pattern that claims a module name: patterns match whole trailing name components
    (`mlp.down_proj` matches `model.layers.3.mlp.down_proj`, `proj` matches neither), and the
    longest matching pattern wins."""
    parts = name.split(".")
    best: str | None = None
    for pattern in patterns:
        tail = pattern.split(".")
        if len(tail) <= len(parts) and parts[len(parts) - len(tail):] == tail:
            if best is None or len(tail) > len(best.split(".")):
                best = pattern
    return best


def llama_layers(shape: ModelConfig) -> list[tuple[str, str, tuple[int, int]]]:
    """(module name in vibee's model, nn type, full weight shape) of every shardable layer of a
    model; one decoder layer stands for all of them."""
    h, i, v = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    return [
        ("model.embed_tokens", "embedding", (v, h)),
        ("model.layers.0.self_attn.qkv_proj", "linear", (q + 2 * kv, h)),
        ("model.layers.0.self_attn.o_proj", "linear", (h, q)),
        ("model.layers.0.mlp.gate_up_proj", "linear", (2 * i, h)),
        ("model.layers.0.mlp.down_proj", "linear", (h, i)),
        ("lm_head", "linear", (v, h)),
    ]


def merged_parts(shape: ModelConfig) -> dict[str, list[tuple[int, int]]]:
    """The merged projections' parts as (rows, unit), the parallel layers' `parts` argument:
    q, k and v in whole heads, gate and up in rows."""
    d = shape.head_dim
    q, kv, i = shape.num_heads * d, shape.num_kv_heads * d, shape.intermediate_size
    return {"qkv_proj": [(q, d), (kv, d), (kv, d)], "gate_up_proj": [(i, 1), (i, 1)]}


def local_rows(parts: list[tuple[int, int]], tp: int) -> int | None:
    """Rows of a merged column-parallel weight on one rank (each part's units split over the
    ranks, or one unit each where there are fewer units than ranks); None when a part splits neither way."""
    total = 0
    for rows, unit in parts:
        n = rows // unit
        if n % tp and tp % n:
            return None
        total += (n // tp if n % tp == 0 else 1) * unit
    return total


# The nn type of each shardable layer name of the Llama family: a plan may not split an
# embedding by rows/columns, nor a linear by vocabulary.
_LLAMA_NN_TYPES = {"embed_tokens": "embedding", **{name: "linear" for name in LLAMA_SHARDING if name != "embed_tokens"}}


class TensorParallelConfig(KindConfig):
    KIND: ClassVar[str] = "tensor_parallel"
    BEHAVIORS: ClassVar[dict[str, str]] = {
        "shard_plan_for": "which sharding style the plan gives a module name (longest matching suffix pattern)",
        "init_tensor_parallel": "join the tensor-parallel process group (no group at all for one rank)",
        "column_parallel_linear": "nn.Linear with output features split over ranks, optionally all-gathered",
        "row_parallel_linear": "nn.Linear with input features split over ranks, partial sums all-reduced",
        "vocab_parallel_embedding": "nn.Embedding with vocabulary rows split over ranks, lookups all-reduced",
        "parallelize": "swap a module's nn.Linear/nn.Embedding children for their parallel twins per the plan",
    }
    TEST_INPUT_KEYS: ClassVar[frozenset[str]] = frozenset({
        "tp_size", "layer", "in_features", "out_features", "bias", "gather_output", "input_is_parallel",
        "batch", "seq_len", "vocab", "embedding_dim", "hidden_size", "intermediate_size", "dtype", "module_name",
    })
    TEST_EXPECTED_KEYS: ClassVar[frozenset[str]] = frozenset({
        "max_abs_err", "local_weight_shape", "output_shape", "all_reduces", "all_gathers", "plan",
    })

    tp_size: int = knob("runtime", flag="--tensor-parallel-size", aliases=("-tp",), default=1, description="ranks that share every sharded layer, one process each (a power of two, 1 to 8)")
    backend: Literal["auto", "nccl", "gloo"] = knob("runtime", "auto", description="torch.distributed backend; auto = nccl on CUDA, gloo otherwise")
    sharding: dict[str, ShardStyle] = knob("runtime",
        default_factory=lambda: dict(LLAMA_SHARDING),
        validate_default=True,
        description="module-name suffix pattern -> column | row | vocab | replicated; unmatched modules stay replicated. "
        "A spec's mapping replaces this default plan as a whole",
    )
    gather_output: list[str] = knob("runtime",
        default_factory=lambda: ["lm_head"],
        validate_default=True,
        description="column-sharded patterns whose output is all-gathered back to full width (logits)",
    )

    @field_validator("tp_size")
    @classmethod
    def _tp_size_power_of_two(cls, v: int) -> int:
        if not 1 <= v <= 8 or v & (v - 1):
            raise ValueError(f"tp_size must be a power of two between 1 and 8, got {v}")
        return v

    @field_validator("sharding")
    @classmethod
    def _plan_fits_layer_types(cls, sharding: dict[str, str]) -> dict[str, str]:
        for pattern in sharding:
            if not _PATTERN.match(pattern):
                raise ValueError(f"sharding pattern {pattern!r} must be a module name or a dotted suffix of one, e.g. qkv_proj or mlp.down_proj")
        problems = []
        for short, nn_type in _LLAMA_NN_TYPES.items():
            style = _style(short, sharding)
            if nn_type == "embedding" and style in ("column", "row"):
                problems.append(f"sharding makes {short} {style!r}, but it is an embedding: use vocab or replicated")
            elif nn_type == "linear" and style == "vocab":
                problems.append(f"sharding makes {short} 'vocab', but it is a linear layer: use column, row or replicated")
        if problems:
            raise ValueError("; ".join(problems))
        return sharding

    @field_validator("gather_output")
    @classmethod
    def _gathers_column_layers(cls, v: list[str], info: ValidationInfo) -> list[str]:
        sharding = info.data.get("sharding")
        if sharding is None:  # sharding itself was invalid and is reported there
            return v
        for pattern in v:
            if pattern not in sharding:
                raise ValueError(f"gather_output names {pattern!r}, which is not a sharding pattern (patterns: {', '.join(sharding) or 'none'}); "
                                 "list the column patterns whose output must be gathered, or write gather_output: []")
            if sharding[pattern] != "column":
                raise ValueError(f"gather_output names {pattern!r}, which sharding makes {sharding[pattern]!r}; only column-sharded layers gather their output")
        return v

    def plan_for(self, name: str) -> str:
        return _style(name, self.sharding)

    def local_weight_shape(self, style: str, shape: tuple[int, int], parts: list[tuple[int, int]] | None = None) -> tuple[int, int]:
        """One rank's share of a weight of `shape` (out x in for linears, vocab x dim for
        embeddings); parts: a merged projection's, split part by part."""
        rows, cols = shape
        tp = self.tp_size
        if style == "column":
            return (rows // tp if parts is None else local_rows(parts, tp) or 0), cols
        if style == "row":
            return rows, cols // tp
        if style == "vocab":
            return -(-rows // tp), cols  # padded up so every rank holds the same number of rows
        return rows, cols

    def derived(self, shape: ModelConfig) -> dict[str, str]:
        tp = self.tp_size
        dtype = shape.torch_dtype if shape.torch_dtype in _DTYPE_BYTES else "bfloat16"
        nbytes = _DTYPE_BYTES[dtype]
        out: dict[str, str] = {
            "ranks": f"{tp}, backend {self.backend}" + (" (nccl on CUDA, gloo otherwise)" if self.backend == "auto" else ""),
            "model": f"hidden {shape.hidden_size}, intermediate {shape.intermediate_size}, heads {shape.num_heads}/"
            f"{shape.num_kv_heads} kv, head_dim {shape.head_dim}, vocab {shape.vocab_size}, {shape.num_layers} layers, {dtype}",
        }
        uneven = [f"{name} {value}" for name, value in (("num_heads", shape.num_heads), ("intermediate_size", shape.intermediate_size))
                  if value % tp]
        if shape.num_kv_heads % tp and tp % shape.num_kv_heads:
            uneven.append(f"num_kv_heads {shape.num_kv_heads}")
        elif shape.num_kv_heads < tp:
            out["kv heads"] = f"{shape.num_kv_heads} over {tp} ranks: each rank holds a copy of one ({tp // shape.num_kv_heads} ranks per head)"
        if uneven:
            out["does not split over tp_size"] = ", ".join(uneven)
        per_layer = embed_and_head = 0
        parts = merged_parts(shape)
        for name, _, full in llama_layers(shape):
            style = self.plan_for(name)
            local = self.local_weight_shape(style, full, parts.get(name.rsplit(".", 1)[-1]))
            size = local[0] * local[1] * nbytes
            short = name.rsplit(".", 1)[-1]
            gathered = " + all-gather" if style == "column" and matching_pattern(name, self.sharding) in self.gather_output else ""
            out[f"{short} weight per rank"] = (f"{list(full)} {style}{gathered} -> {list(local)} ({_size(size)})" if local[0]
                                                 else f"{list(full)} {style}: its heads do not split over {tp} ranks")
            if ".layers." in name:
                per_layer += size
            else:
                embed_and_head += size
        norms = (2 * shape.num_layers + 1) * shape.hidden_size * nbytes  # RMSNorm weights stay replicated
        out["weights per rank, one decoder layer"] = _size(per_layer)
        out["weights per rank, whole model"] = _size(per_layer * shape.num_layers + embed_and_head + norms)
        row_layers = [n.rsplit(".", 1)[-1] for n, _, _ in llama_layers(shape) if ".layers." in n and self.plan_for(n) == "row"]
        if tp == 1 or not row_layers:
            out["all-reduce bytes per token per layer"] = "0 (no row-sharded layer communicates)" if tp > 1 else "0 (tp_size 1: no communication)"
        else:
            payload = len(row_layers) * shape.hidden_size * nbytes
            ring = payload * 2 * (tp - 1) // tp
            out["all-reduce bytes per token per layer"] = (
                f"{payload:,} B ({len(row_layers)} x hidden_size {dtype}, after {' and '.join(row_layers)}); "
                f"ring traffic per rank {ring:,} B"
            )
        return out


def _style(name: str, sharding: dict[str, str]) -> str:
    pattern = matching_pattern(name, sharding)
    return "replicated" if pattern is None else sharding[pattern]


def _size(nbytes: int) -> str:
    if nbytes >= 1 << 20:
        return f"{nbytes:,} B = {nbytes / (1 << 20):,.1f} MiB"
    return f"{nbytes:,} B"
