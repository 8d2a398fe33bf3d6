"""Pre-quantized checkpoints: GPTQ (symmetric and not, 4 and 8 bits, both zero-point formats) and
AWQ (GEMM packing), written here from the formats' published layouts with a tiny random Llama,
load into the generated QuantLinear and give the logits of transformers running the same model
with the weights the codes stand for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.runtime.hf_models import edit_json, make_model
from vibee.runtime.attention import make_attention_batch
from vibee.runtime.config import EngineConfig
from vibee.runtime.engine import LLMEngine
from vibee.runtime.generated import load_generated
from vibee.runtime.loader import LoadError, load_model_dir
from vibee.runtime.model import build_model
from vibee.runtime.offline import generate
from vibee.runtime.sampling_params import SamplingParams

pytest.importorskip("transformers")

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: nibble k of a word holds output AWQ_ORDER[k] of its eight


def int32_words(values: torch.Tensor) -> torch.Tensor:
    """int64 bit patterns of 32-bit words as int32 (two's complement)."""
    values = values & 0xFFFFFFFF
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def quantize(w: torch.Tensor, bits: int, group: int, symmetric: bool):
    """Codes [out, in] in 0..2^bits-1, fp16 scales and integer zero points [out, groups], and the
    weight they stand for (float32)."""
    out_features, in_features = w.shape
    groups = w.reshape(out_features, in_features // group, group)
    top = 2**bits - 1
    if symmetric:
        scale = groups.abs().amax(-1) / (2 ** (bits - 1) - 1)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
        scale = (high - low) / top
        zero = torch.round(-low / scale)
    scale = scale.half().float()
    codes = torch.clamp(torch.round(groups / scale[..., None]) + zero[..., None], 0, top)
    weight = ((codes - zero[..., None]) * scale[..., None]).reshape(out_features, in_features)
    return codes.reshape(out_features, in_features).long(), scale.half(), zero.long(), weight


def gptq_layer(w: torch.Tensor, bits: int, group: int, symmetric: bool, zeros_minus_one: bool):
    codes, scale, zero, weight = quantize(w, bits, group, symmetric)
    per = 32 // bits
    by_input = codes.T  # [in, out]: word r of a column holds inputs r*per .. r*per + per - 1
    qweight = sum(by_input[j::per] << (bits * j) for j in range(per))
    zeros = (zero - int(zeros_minus_one)).T  # [groups, out], packed along the outputs
    qzeros = sum(zeros[:, j::per] << (bits * j) for j in range(per))
    g_idx = (torch.arange(w.shape[1]) // group).to(torch.int32)
    return {"qweight": int32_words(qweight), "qzeros": int32_words(qzeros), "scales": scale.T.contiguous(),
            "g_idx": g_idx}, weight


def awq_layer(w: torch.Tensor, group: int):
    codes, scale, zero, weight = quantize(w, 4, group, symmetric=False)

    def pack(values: torch.Tensor) -> torch.Tensor:  # [rows, out] -> [rows, out / 8]
        eights = values.reshape(values.shape[0], -1, 8)
        return int32_words(sum(eights[:, :, AWQ_ORDER[k]] << (4 * k) for k in range(8)))

    return {"qweight": pack(codes.T), "qzeros": pack(zero.T), "scales": scale.T.contiguous()}, weight


def write_checkpoint(model_dir: Path, method: str, *, bits: int = 4, group: int = 32, symmetric: bool = True,
                     fmt: str = "gptq", seed: int = 0):
    """A tiny random Llama saved as a `method` checkpoint; returns transformers' model with the
    weights the codes stand for."""
    hf = make_model(model_dir, hidden=64, layers=2, seed=seed)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    for i in range(hf.config.num_hidden_layers):
        for name in LINEARS:
            prefix = f"model.layers.{i}.{name}"
            w = state.pop(prefix + ".weight").float()
            width = w.shape[1] if group == -1 else group  # -1: one group spans the row
            tensors, weight = (gptq_layer(w, bits, width, symmetric, fmt == "gptq") if method == "gptq"
                               else awq_layer(w, width))
            state.update({f"{prefix}.{k}": v for k, v in tensors.items()})
            hf.get_submodule(prefix).weight.data.copy_(weight)
    for old in model_dir.glob("model*.safetensors*"):
        old.unlink()
    save_file({k: v.contiguous() for k, v in state.items()}, str(model_dir / "model.safetensors"))
    config = ({"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": symmetric,
               "checkpoint_format": fmt} if method == "gptq" else
              {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"})
    edit_json(model_dir / "config.json", quantization_config=config)
    return hf


def vibee_logits(model_dir: Path, ids: list[int]) -> torch.Tensor:
    settings = EngineConfig(model=model_dir).knob_settings("float32")
    settings["quantization"]["compute_dtype"] = "fp32"  # exact scales and sums: compare tightly
    gen = load_generated(knobs=settings)
    loaded = load_model_dir(model_dir, dtype=torch.float32, progress=False)
    model = build_model(loaded, gen).eval()
    assert sum(isinstance(m, gen.quantization.QuantLinear) for m in model.modules()) == 4 * 2  # qkv, o, gate_up, down
    batch = make_attention_batch([len(ids)], [len(ids)], None, 16, "cpu")
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), batch.positions(), batch, None))


CASES = {
    "gptq-int4-sym": dict(method="gptq"),
    "gptq-int4-asym": dict(method="gptq", symmetric=False),
    "gptq-v2-int4-asym": dict(method="gptq", symmetric=False, fmt="gptq_v2"),
    "gptq-int8-sym": dict(method="gptq", bits=8),
    "gptq-int4-per-channel": dict(method="gptq", group=-1),
    "awq-int4": dict(method="awq"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_logits_match_transformers_on_the_dequantized_weights(tmp_path, case):
    hf = write_checkpoint(tmp_path, **CASES[case])
    ids = [3, 17, 42, 99, 5, 250, 7, 61, 12, 140]
    with torch.inference_mode():
        expected = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(vibee_logits(tmp_path, ids), expected, rtol=1e-4, atol=1e-4)


def test_engine_serves_a_gptq_checkpoint_and_reports_where_the_codes_came_from(tmp_path):
    write_checkpoint(tmp_path, "gptq")
    engine = LLMEngine(EngineConfig(model=tmp_path, device="cpu"), progress=False)
    assert engine.applied_quantization() == {"method": "gptq", "bits": 4, "group_size": 32, "source": "gptq checkpoint",
                                             "layers_quantized": 8}
    (out,) = generate(engine, [[3, 17, 42]], SamplingParams(max_tokens=5, temperature=0))
    assert len(out.outputs[0].token_ids) == 5
    with pytest.raises(ValueError, match="drop --quant"):
        LLMEngine(EngineConfig(model=tmp_path, device="cpu", quant="int4"), progress=False)


@pytest.mark.parametrize("change, message", [
    ({"desc_act": True}, "desc_act"),
    ({"bits": 3}, "3 bits"),
    ({"quant_method": "bitsandbytes"}, "'bitsandbytes' is not supported"),
    ({"group_size": 48}, "group_size 48"),
])
def test_formats_vibee_does_not_read_are_named(tmp_path, change, message):
    write_checkpoint(tmp_path, "gptq")
    config = json.loads((tmp_path / "config.json").read_text())
    edit_json(tmp_path / "config.json", quantization_config={**config["quantization_config"], **change})
    with pytest.raises(LoadError, match=message):
        load_model_dir(tmp_path, progress=False)


def test_an_act_order_g_idx_is_refused(tmp_path):
    write_checkpoint(tmp_path, "gptq")
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.g_idx"] = state["model.layers.0.mlp.up_proj.g_idx"].flip(0).contiguous()
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(LoadError, match="act-order"):
        build_model(load_model_dir(tmp_path, progress=False), load_generated(
            knobs=EngineConfig(model=tmp_path).knob_settings("float32")))
