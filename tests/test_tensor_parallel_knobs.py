"""The tensor_parallel spec drives the generated module: change one knob of
specs/tri/igla_tensor_parallel.vibee, and the module given the IR's values (tp_size, backend,
the plan: runtime arguments, none baked in) behaves differently."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vibee.frontend.errors import SpecError
from vibee.runtime.shapes import shape_config

NAME = "igla_tensor_parallel"


def _swap(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} should occur once in the spec"
    return text.replace(old, new)


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def _plan(gen) -> dict:
    """The spec's sharding plan, passed to parallelize as the runtime does."""
    return dict(sharding=gen.spec.config.sharding, gather_output=gen.spec.config.gather_output)


def _attention_block() -> nn.Module:
    """model.layers.0.self_attn.{qkv_proj,o_proj} and model.layers.0.mlp.{gate_up_proj,down_proj}, as vibee's model names them."""
    root = nn.Module()
    root.model = nn.Module()
    root.model.layers = nn.ModuleList([nn.Module()])
    layer = root.model.layers[0]
    layer.self_attn = nn.Module()
    layer.self_attn.qkv_proj = nn.Linear(16, 16)
    layer.self_attn.o_proj = nn.Linear(16, 16)
    layer.mlp = nn.Module()
    layer.mlp.gate_up_proj = nn.Linear(16, 32)
    layer.mlp.down_proj = nn.Linear(32, 16)
    return root


def test_replicated_o_proj_is_left_unsharded(gen_from_text, spec_text):
    text = spec_text("tensor_parallel")
    base = gen_from_text(text, NAME)
    changed = gen_from_text(_swap(text, "o_proj: row", "o_proj: replicated"), NAME)

    model = base.impl.parallelize(_attention_block(), 0, 2, None, **_plan(base))
    o_proj = model.get_submodule("model.layers.0.self_attn.o_proj")
    assert isinstance(o_proj, base.impl.RowParallelLinear) and list(o_proj.weight.shape) == [16, 8]

    block = _attention_block()
    original = block.get_submodule("model.layers.0.self_attn.o_proj")
    model = changed.impl.parallelize(block, 0, 2, None, **_plan(changed))
    assert changed.impl.shard_plan_for("model.layers.0.self_attn.o_proj", changed.spec.config.sharding) == "replicated"
    assert model.get_submodule("model.layers.0.self_attn.o_proj") is original
    assert list(original.weight.shape) == [16, 16]
    # the rest of the plan is untouched
    assert isinstance(model.get_submodule("model.layers.0.self_attn.qkv_proj"), changed.impl.ColumnParallelLinear)
    assert isinstance(model.get_submodule("model.layers.0.mlp.down_proj"), changed.impl.RowParallelLinear)
    # and the generated tests of the changed spec agree with it
    assert changed.run_tests() == 0


def test_tp_size_four_quarters_every_shard(gen_from_text, spec_text):
    text = spec_text("tensor_parallel")
    base = gen_from_text(text, NAME)
    changed = gen_from_text(_swap(text, "\n  tp_size: 1 ", "\n  tp_size: 4 "), NAME)
    for gen, tp in ((base, 1), (changed, 4)):
        impl = gen.impl
        assert gen.spec.config.tp_size == tp
        column = impl.ColumnParallelLinear(16, 32, tp_rank=0, tp_size=tp)
        row = impl.RowParallelLinear(32, 16, tp_rank=0, tp_size=tp)
        vocab = impl.VocabParallelEmbedding(10, 4, tp_rank=0, tp_size=tp)
        assert list(column.weight.shape) == [32 // tp, 16] and list(column.bias.shape) == [32 // tp]
        assert list(row.weight.shape) == [16, 32 // tp] and list(row.bias.shape) == [16]
        assert list(vocab.weight.shape) == [-(-10 // tp), 4]
        model = impl.parallelize(_attention_block(), 0, tp, None, **_plan(gen))
        shapes = {s.name.rsplit(".", 1)[-1]: s.local_shape for s in impl.describe_shards(model)}
        assert shapes == {"qkv_proj": [16 // tp, 16], "o_proj": [16, 16 // tp], "gate_up_proj": [32 // tp, 16], "down_proj": [16, 32 // tp]}
        # 32 query heads and 8 kv heads of 64: q, k and v split by heads
        assert gen.spec.config.derived(shape_config("llama-3.2-1b"))["qkv_proj weight per rank"].startswith(f"[3072, 2048] column -> [{3072 // tp}, 2048]")


def test_longer_pattern_overrides_a_shorter_one(gen_from_text, spec_text):
    text = spec_text("tensor_parallel")
    changed = gen_from_text(_swap(text, "    o_proj: row ", "    self_attn.o_proj: replicated\n    o_proj: row "), NAME)
    impl, sharding = changed.impl, changed.spec.config.sharding
    assert impl.shard_plan_for("model.layers.0.self_attn.o_proj", sharding) == "replicated"
    assert impl.shard_plan_for("model.layers.0.cross_attn.o_proj", sharding) == "row"
    root = _attention_block()
    root.model.layers[0].cross_attn = nn.Module()
    root.model.layers[0].cross_attn.o_proj = nn.Linear(16, 16)
    impl.parallelize(root, 1, 2, None, **_plan(changed))
    assert type(root.get_submodule("model.layers.0.self_attn.o_proj")) is nn.Linear
    assert isinstance(root.get_submodule("model.layers.0.cross_attn.o_proj"), impl.RowParallelLinear)


def test_backend_knob_picks_the_backend(gen_from_text, spec_text):
    changed = gen_from_text(_swap(spec_text("tensor_parallel"), "backend: auto", "backend: gloo"), NAME)
    assert changed.impl.resolve_backend(changed.spec.config.backend) == "gloo"  # even where CUDA would pick nccl
    auto = gen_from_text(spec_text("tensor_parallel"), NAME)
    assert auto.impl.resolve_backend(auto.spec.config.backend) == ("nccl" if torch.cuda.is_available() else "gloo")


def test_tp_size_not_a_power_of_two_is_an_error_at_its_line(gen_from_text, spec_text):
    text = _swap(spec_text("tensor_parallel"), "\n  tp_size: 1 ", "\n  tp_size: 3 ")
    with pytest.raises(SpecError, match="power of two") as err:
        gen_from_text(text, NAME)
    assert f":{_line_of(text, 'tp_size: 3')}:" in str(err.value)
    assert "got 3" in str(err.value)


def test_unknown_sharding_style_lists_the_allowed_ones(gen_from_text, spec_text):
    text = _swap(spec_text("tensor_parallel"), "o_proj: row", "o_proj: diagonal")
    with pytest.raises(SpecError) as err:
        gen_from_text(text, NAME)
    message = str(err.value)
    assert "diagonal" in message and f":{_line_of(text, 'o_proj: diagonal')}:" in message
    for style in ("column", "row", "vocab", "replicated"):
        assert f"'{style}'" in message


def test_explain_flags_heads_that_do_not_split_over_tp_size():
    from vibee.kinds.tensor_parallel.config import TensorParallelConfig

    shape = shape_config("llama-3.2-1b")  # 32 query heads, 8 kv heads of 64
    fewer = TensorParallelConfig(tp_size=8).derived(shape.model_copy(update={"num_kv_heads": 4}))
    assert "does not split over tp_size" not in fewer  # 4 kv heads over 8 ranks: a copy of one on each
    assert fewer["kv heads"].startswith("4 over 8 ranks") and fewer["qkv_proj weight per rank"].startswith("[2560, 2048] column -> [384, 2048]")
    uneven = TensorParallelConfig(tp_size=4).derived(shape.model_copy(update={"num_kv_heads": 6}))
    assert uneven["does not split over tp_size"] == "num_kv_heads 6"


def test_gathering_a_row_layer_is_an_error(gen_from_text, spec_text):
    text = _swap(spec_text("tensor_parallel"), "gather_output: [lm_head]", "gather_output: [o_proj]")
    with pytest.raises(SpecError, match="only column-sharded layers gather their output"):
        gen_from_text(text, NAME)
