"""The model's merged projections: self_attn.qkv_proj holds q_proj/k_proj/v_proj and mlp.gate_up_proj
holds gate_proj/up_proj stacked along the output rows. They load from Hugging Face names, compute
what the separate projections compute, and quantize to exactly the separately quantized parts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.runtime.hf_models import generated, model_cache
from vibee.runtime.config import EngineConfig
from vibee.runtime.loader import load_model_dir
from vibee.runtime.model import build_model
from vibee.runtime.model_config import LoadError

# hidden 128 and intermediate 256: whole int4 groups of 128 in every projection.
VARIANTS = {
    "qwen2": ("qwen2", {}),  # q/k/v biases
    "llama_bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama_h128": ("llama", {"hidden": 128, "heads": 2, "kv_heads": 1}),  # head_dim 64
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return model_cache(tmp_path_factory, VARIANTS)


def ours(model_dir, gen=None):
    loaded = load_model_dir(model_dir, dtype=torch.float32, device="cpu", progress=False)
    return build_model(loaded, gen or generated()).eval()


@pytest.mark.parametrize("name", ["qwen2", "llama_bias"])
def test_merged_outputs_equal_the_separate_projections(models, name):
    model_dir, hf = models(name)
    model = ours(model_dir)
    cfg = model.config
    x = torch.randn(7, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    with torch.no_grad():
        for layer, hf_layer in zip(model.model.layers, hf.model.layers):
            attn, hf_attn = layer.self_attn, hf_layer.self_attn
            assert attn.qkv_proj.weight.shape == (q_out + 2 * kv_out, cfg.hidden_size)
            assert (attn.qkv_proj.bias is not None) == cfg.attention_bias
            q, k, v = attn.qkv_proj(x).split(attn.split_sizes, dim=-1)
            torch.testing.assert_close(q, hf_attn.q_proj(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(k, hf_attn.k_proj(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v, hf_attn.v_proj(x), atol=1e-5, rtol=1e-5)
            # The loaded rows are the checkpoint's tensors, bit for bit.
            w = torch.cat([hf_attn.q_proj.weight, hf_attn.k_proj.weight, hf_attn.v_proj.weight])
            assert torch.equal(attn.qkv_proj.weight, w)
            mlp, hf_mlp = layer.mlp, hf_layer.mlp
            assert mlp.gate_up_proj.weight.shape == (2 * cfg.intermediate_size, cfg.hidden_size)
            gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
            torch.testing.assert_close(gate, hf_mlp.gate_proj(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(up, hf_mlp.up_proj(x), atol=1e-5, rtol=1e-5)
            assert torch.equal(mlp.gate_up_proj.weight, torch.cat([hf_mlp.gate_proj.weight, hf_mlp.up_proj.weight]))
            if cfg.mlp_bias:
                assert torch.equal(mlp.gate_up_proj.bias, torch.cat([hf_mlp.gate_proj.bias, hf_mlp.up_proj.bias]))
            # The whole MLP (strided halves into silu_mul) as transformers'.
            torch.testing.assert_close(mlp(x), hf_mlp(x), atol=1e-5, rtol=1e-5)


def test_checkpoint_names_and_errors_stay_hugging_face_ones(models, tmp_path):
    model_dir, _ = models("qwen2")
    model = ours(model_dir)
    names = set(model.checkpoint_targets())
    assert names == set(load_file(model_dir / "model.safetensors"))
    assert "model.layers.1.self_attn.v_proj.bias" in names and "model.layers.1.mlp.up_proj.weight" in names
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in names)

    tensors = load_file(model_dir / "model.safetensors")
    broken = dict(tensors)
    del broken["model.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(LoadError, match=r"missing tensor model\.layers\.1\.self_attn\.k_proj\.bias"):
        model.load_weights(broken)
    broken = dict(tensors)
    broken["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, model.config.hidden_size)
    with pytest.raises(LoadError, match=r"tensor model\.layers\.0\.mlp\.up_proj\.weight has shape \[3, "):
        model.load_weights(broken)


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_quantized_merged_equals_the_separately_quantized_parts(models, quant, tmp_path, monkeypatch):
    from vibee.runtime.generated import load_generated

    if quant == "int4":
        gen = generated()
    else:
        monkeypatch.setenv("VIBEE_CACHE_DIR", str(tmp_path / "cache"))
        gen = load_generated(knobs=EngineConfig(quant="int8").knob_settings("float32"))
    q = gen.quantization
    assert q.BITS == (4 if quant == "int4" else 8)
    model_dir, hf = models("llama_h128")
    model = ours(model_dir, gen)
    q.quantize_model(model, gen.config("quantization").skip_modules)
    for layer, hf_layer in zip(model.model.layers, hf.model.layers):
        for merged, parts in ((layer.self_attn.qkv_proj, [hf_layer.self_attn.q_proj, hf_layer.self_attn.k_proj,
                                                          hf_layer.self_attn.v_proj]),
                              (layer.mlp.gate_up_proj, [hf_layer.mlp.gate_proj, hf_layer.mlp.up_proj])):
            assert isinstance(merged, q.QuantLinear)
            got = merged.quantized_weight()
            separate = [q.quantize_weight(p.weight.detach(), dtype=got.scales.dtype) for p in parts]
            assert got.group_size == separate[0].group_size
            assert torch.equal(got.scales, torch.cat([s.scales for s in separate]))
            if got.zeros is not None:
                assert torch.equal(got.zeros, torch.cat([s.zeros for s in separate]))
            assert torch.equal(q.unpack_codes(got.qweight), torch.cat([q.unpack_codes(s.qweight) for s in separate]))
            assert torch.equal(q.dequantize(got), torch.cat([q.dequantize(s) for s in separate]))


def test_module_names_the_quantizer_sees(models):
    model_dir, _ = models("llama_h128")
    q = generated().quantization
    model = ours(model_dir)
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    per_layer = {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}
    expected = {f"model.layers.{i}.{n}" for i in range(model.config.num_layers) for n in per_layer} | {"lm_head"}
    assert linears == expected
    stats = q.quantize_model(model, skip_modules=["lm_head"])
    assert stats.layers_quantized == 4 * model.config.num_layers and stats.layers_skipped == 1
    quantized = {name for name, m in model.named_modules() if isinstance(m, q.QuantLinear)}
    assert quantized == expected - {"lm_head"}
    # skip_modules names the merged modules by their own names.
    model = ours(model_dir)
    stats = q.quantize_model(model, skip_modules=["lm_head", "qkv_proj"])
    assert stats.layers_quantized == 3 * model.config.num_layers
    assert type(model.model.layers[0].self_attn.qkv_proj) is torch.nn.Linear
