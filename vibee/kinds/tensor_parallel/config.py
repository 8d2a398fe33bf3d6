"""Config of the tensor_parallel kind: how many ranks share each layer, over which backend, and
which layers shard how (column, row, vocab or replicated), plus the example model shape that the
derived figures and the divisibility checks are computed for."""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from vibee.ir.spec import KindConfig, knob

ShardStyle = Literal["column", "row", "vocab", "replicated"]

# Megatron-style plan for Llama-family decoders: the projections that fan out (q/k/v, gate/up)
# split their output features, the ones that fan back in (o, down) split their input features,
# so one all-reduce per attention block and one per MLP block brings the activations back whole.
LLAMA_SHARDING: dict[str, str] = {
    "q_proj": "column",
    "k_proj": "column",
    "v_proj": "column",
    "o_proj": "row",
    "gate_proj": "column",
    "up_proj": "column",
    "down_proj": "row",
    "embed_tokens": "vocab",
    "lm_head": "column",
}

_PATTERN = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


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


class ExampleModel(BaseModel):
    """The model shape that derived figures are computed for and that must split evenly over
    tp_size (defaults: Llama-3.2-1B)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_size: int = Field(2048, gt=0, description="width of the residual stream")
    intermediate_size: int = Field(8192, gt=0, description="width of the MLP's gate/up projections")
    num_heads: int = Field(32, gt=0, description="query heads")
    num_kv_heads: int = Field(8, gt=0, description="key/value heads (grouped-query attention)")
    vocab_size: int = Field(128256, gt=0, description="rows of embed_tokens and lm_head")
    num_layers: int = Field(16, gt=0, description="decoder layers, for whole-model byte figures")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("bfloat16", description="element type of weights and activations in the byte figures")

    @model_validator(mode="after")
    def _heads_fit(self) -> "ExampleModel":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads}) to give a whole head_dim")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads ({self.num_kv_heads})")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    def layers(self) -> list[tuple[str, str, tuple[int, int]]]:
        """(module name as in a Hugging Face Llama checkpoint, nn type, full weight shape) of every
        shardable layer; one decoder layer stands for all of them."""
        h, i, v, kv = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_kv_heads * self.head_dim
        return [
            ("model.embed_tokens", "embedding", (v, h)),
            ("model.layers.0.self_attn.q_proj", "linear", (h, h)),
            ("model.layers.0.self_attn.k_proj", "linear", (kv, h)),
            ("model.layers.0.self_attn.v_proj", "linear", (kv, h)),
            ("model.layers.0.self_attn.o_proj", "linear", (h, h)),
            ("model.layers.0.mlp.gate_proj", "linear", (i, h)),
            ("model.layers.0.mlp.up_proj", "linear", (i, h)),
            ("model.layers.0.mlp.down_proj", "linear", (h, i)),
            ("lm_head", "linear", (v, h)),
        ]


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

    tp_size: int = knob("runtime", flag="--tensor-parallel-size", aliases=("-tp",), default=2, description="ranks that share every sharded layer (a power of two, 1 to 8)")
    backend: Literal["auto", "nccl", "gloo"] = knob("runtime", "auto", description="torch.distributed backend; auto = nccl on CUDA, gloo otherwise")
    # model comes before sharding so that the sharding check can see the shape it must split.
    model: ExampleModel = knob("compile", default_factory=ExampleModel, validate_default=True,
                                description="example model shape for derived figures and divisibility checks")
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

    @field_validator("model")
    @classmethod
    def _heads_split_evenly(cls, m: ExampleModel, info: ValidationInfo) -> ExampleModel:
        tp = info.data.get("tp_size")
        if tp is None:  # reported at tp_size
            return m
        problems = [
            f"model.{name} ({value}) is not divisible by tp_size ({tp})"
            for name, value in (("num_heads", m.num_heads), ("num_kv_heads", m.num_kv_heads),
                                ("hidden_size", m.hidden_size), ("intermediate_size", m.intermediate_size))
            if value % tp
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return m

    @field_validator("sharding")
    @classmethod
    def _plan_fits_model(cls, sharding: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        for pattern in sharding:
            if not _PATTERN.match(pattern):
                raise ValueError(f"sharding pattern {pattern!r} must be a module name or a dotted suffix of one, e.g. q_proj or mlp.down_proj")
        tp, m = info.data.get("tp_size"), info.data.get("model")
        if tp is None or m is None:  # reported at tp_size / model
            return sharding
        problems = []
        for name, nn_type, (rows, cols) in m.layers():
            style = _style(name, sharding)
            short = name.rsplit(".", 1)[-1]
            if nn_type == "embedding" and style in ("column", "row"):
                problems.append(f"sharding makes {short} {style!r}, but it is an embedding: use vocab or replicated")
            elif nn_type == "linear" and style == "vocab":
                problems.append(f"sharding makes {short} 'vocab', but it is a linear layer: use column, row or replicated")
            elif style == "column" and rows % tp:
                problems.append(f"{short} is column-sharded but its {rows} output features (model shape) are not divisible by tp_size ({tp})")
            elif style == "row" and cols % tp:
                problems.append(f"{short} is row-sharded but its {cols} input features (model shape) are not divisible by tp_size ({tp})")
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

    def local_weight_shape(self, style: str, shape: tuple[int, int]) -> tuple[int, int]:
        """One rank's share of a weight of `shape` (out x in for linears, vocab x dim for embeddings)."""
        rows, cols = shape
        tp = self.tp_size
        if style == "column":
            return rows // tp, cols
        if style == "row":
            return rows, cols // tp
        if style == "vocab":
            return -(-rows // tp), cols  # padded up so every rank holds the same number of rows
        return rows, cols

    def derived(self) -> dict[str, str]:
        m, tp = self.model, self.tp_size
        nbytes = m.dtype_bytes
        out: dict[str, str] = {
            "ranks": f"{tp}, backend {self.backend}" + (" (nccl on CUDA, gloo otherwise)" if self.backend == "auto" else ""),
            "example model": f"hidden {m.hidden_size}, intermediate {m.intermediate_size}, heads {m.num_heads}/{m.num_kv_heads} kv, "
            f"head_dim {m.head_dim}, vocab {m.vocab_size}, {m.num_layers} layers, {m.dtype}",
        }
        per_layer = embed_and_head = 0
        for name, _, shape in m.layers():
            style = self.plan_for(name)
            local = self.local_weight_shape(style, shape)
            size = local[0] * local[1] * nbytes
            short = name.rsplit(".", 1)[-1]
            gathered = " + all-gather" if style == "column" and matching_pattern(name, self.sharding) in self.gather_output else ""
            out[f"{short} weight per rank"] = f"{list(shape)} {style}{gathered} -> {list(local)} ({_size(size)})"
            if ".layers." in name:
                per_layer += size
            else:
                embed_and_head += size
        norms = (2 * m.num_layers + 1) * m.hidden_size * nbytes  # RMSNorm weights stay replicated
        out["weights per rank, one decoder layer"] = _size(per_layer)
        out["weights per rank, whole model"] = _size(per_layer * m.num_layers + embed_and_head + norms)
        row_layers = [n.rsplit(".", 1)[-1] for n, _, _ in m.layers() if ".layers." in n and self.plan_for(n) == "row"]
        if tp == 1 or not row_layers:
            out["all-reduce bytes per token per layer"] = "0 (no row-sharded layer communicates)" if tp > 1 else "0 (tp_size 1: no communication)"
        else:
            payload = len(row_layers) * m.hidden_size * nbytes
            ring = payload * 2 * (tp - 1) // tp
            out["all-reduce bytes per token per layer"] = (
                f"{payload:,} B ({len(row_layers)} x hidden_size {m.dtype}, after {' and '.join(row_layers)}); "
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
