"""Every knob of every kind is tagged compile-time or runtime (vibee.ir.spec.knob), and the tag is
true of the generated code: a runtime knob set to another value leaves the generated
implementation byte-identical (the value is an argument, so a serve flag needs no generation),
while a compile-time knob changes it (the generator specializes on it, so it does something)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vibee.codegen.generate import implementation_template
from vibee.codegen.render import render
from vibee.ir.load import load_specs
from vibee.kinds.registry import KINDS

SPEC_DIR = Path(__file__).resolve().parents[1] / "specs" / "tri"

# Another valid value for every knob of every kind (a new knob must be added here).
OTHER_VALUE = {
    "kv_cache": {
        "block_size": 32,
        "kv_dtype": "int8",
        "enable_prefix_caching": False,
        "fuse_kv_store": False,
        "gpu_memory_utilization": 0.5,
    },
    "flash_attention": {
        "head_dims": [64],
        "causal": False,
        "softmax_scale": 0.5,
        "prefill": {"block_m": 32, "block_n": 32, "num_warps": 2, "num_stages": 2, "autotune": []},
        "decode": {"split_kv": 3, "min_block_kv": 64, "max_splits": 4},
    },
    "quantization": {
        "bits": 8,
        "code_type": "fp8",
        "group_size": 64,
        "symmetric": False,
        "pack_format": "uint8",
        "compute_dtype": "fp16",
        "tiles": [{"kernel": "mm", "block_m": 32, "block_n": 32, "block_k": 64}],
        "fp8_tiles": [{"block_m": 32, "block_n": 32, "block_k": 64}],
        "fp8_triton_max_rows": 4,
        "skip_modules": ["not_a_layer"],
        "method": "gptq",
        "damp_percent": 0.1,
        "act_order": False,
        "calibration_samples": 16,
        "calibration_seq_len": 128,
    },
    "speculative_decode": {
        "method": "medusa",
        "medusa_heads": "elsewhere/medusa_heads.safetensors",
        "num_speculative_tokens": 2,
        "ngram": {"min_n": 2, "max_n": 2},
        "verification": "greedy",
        "disable_by_batch_size": 8,
        "acceptance_threshold": 0.5,
    },
    "continuous_batch": {
        "policy": "priority",
        "max_num_seqs": 8,
        "max_num_batched_tokens": 512,
        "enable_chunked_prefill": False,
        "long_prefill_token_threshold": 64,
        "watermark": 0.2,
        "preemption_mode": "swap",
        "swap_space_gib": 8.0,
        "num_scheduler_steps": 1,
    },
    "tensor_parallel": {
        "tp_size": 4,
        "backend": "gloo",
        "sharding": {"o_proj": "replicated"},
        "gather_output": [],
    },
    "decoder": {
        "rms_norm_warps": [{"num_warps": 2}],
        "rope_warps": [{"num_warps": 2}],
        "silu_mul_block": 256,
        "one_token_gemv": False,
        "gemv_tiles": [{"block_n": 16, "block_k": 256}],
    },
}


@pytest.fixture(scope="module")
def shipped():
    specs, _ = load_specs(sorted(SPEC_DIR.glob("*.vibee")))
    return {spec.kind: spec for spec in specs}


def _implementation(spec) -> str:
    return render(implementation_template(spec), spec=spec, cfg=spec.config, module=spec.module, header="")


def _with(spec, field: str, value):
    data = spec.config.model_dump()
    if field == "enable_chunked_prefill":  # a chunk cap needs chunked prefill
        data["long_prefill_token_threshold"] = 0
    if field == "code_type":  # fp8 codes have one format: 8 bits, per channel, symmetric, round to nearest
        data.update(bits=8, group_size=-1, symmetric=True, method="rtn")
    if isinstance(value, dict) and isinstance(data[field], dict) and field != "sharding":
        data[field] = {**data[field], **value}
    elif field == "sharding":
        data[field] = {**data[field], **value}
    else:
        data[field] = value
    config = type(spec.config).model_validate(data)
    assert getattr(config, field) != getattr(spec.config, field), f"pick another value for {field}"
    return spec.model_copy(update={"config": config})


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_knob_has_a_stage_and_another_value_here(kind):
    model = KINDS[kind].config
    for name in model.model_fields:
        model.stage_of(name)  # raises for a field declared without knob(stage, ...)
    assert set(OTHER_VALUE[kind]) == set(model.model_fields)


@pytest.mark.parametrize(
    "kind, field", [(kind, field) for kind, values in OTHER_VALUE.items() for field in values]
)
def test_stage_is_true_of_the_generated_implementation(shipped, kind, field):
    spec = shipped[kind]
    if kind == "quantization" and field.startswith("fp8_"):  # the fp8 codes' knobs: an fp8 spec's module
        spec = _with(spec, "code_type", "fp8")
    before, after = _implementation(spec), _implementation(_with(spec, field, OTHER_VALUE[kind][field]))
    if type(spec.config).stage_of(field) == "runtime":
        assert before == after, f"{kind}.{field} is tagged runtime but its value is compiled into the module"
    else:
        assert before != after, f"{kind}.{field} is tagged compile-time but the generated module ignores it"
