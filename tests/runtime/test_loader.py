"""Loading Hugging Face model directories: configs of every supported shape, sharded weights,
the tokenizer and its chat template, and a one-line LoadError naming the file for each way a
directory can be broken."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vibee.runtime.attention import make_attention_batch
from vibee.runtime.loader import LoadError, load_model_dir
from vibee.runtime.model import LlamaForCausalLM, build_model
from vibee.runtime.model_config import ModelConfig
from vibee.runtime.tokenizer import ChatTemplateError, Tokenizer

from .hf_models import edit_json, generated, make_model, write_tokenizer

BASE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return path, make_model(path, "llama")


@pytest.fixture
def broken(llama_dir, tmp_path):
    """A fresh copy of the good model directory to break."""
    target = tmp_path / "model"
    shutil.copytree(llama_dir[0], target)
    return target


def load(path, **kwargs):
    return load_model_dir(path, dtype=torch.float32, device="cpu", progress=False, **kwargs)


def logits_of(model, seq: list[int]) -> torch.Tensor:
    batch = make_attention_batch([len(seq)], [len(seq)], None, 16)
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(seq), batch.positions(), batch, None))


def assert_load_error(path, file_name: str, words: str, **kwargs) -> str:
    with pytest.raises(LoadError) as info:
        model = build_model(load(path, **kwargs), generated())
        del model
    message = str(info.value)
    assert "\n" not in message
    assert file_name in message, message
    assert words in message, message
    return message


# ---- config.json ------------------------------------------------------------------------------


def test_config_defaults_and_derived_values():
    cfg = ModelConfig.from_hf_dict(BASE)
    assert (cfg.architecture, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("LlamaForCausalLM", 2, 4, 2, 16)
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling is None and cfg.rms_norm_eps == 1e-6
    assert not cfg.tie_word_embeddings and not cfg.attention_bias and cfg.eos_token_ids == []
    assert ModelConfig.from_hf_dict({**BASE, "num_key_value_heads": None}).num_kv_heads == 4  # MHA
    assert ModelConfig.from_hf_dict({**BASE, "head_dim": 64}).head_dim == 64


def test_old_and_new_rope_layouts_read_the_same():
    old = {**BASE, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    new = {**BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    assert ModelConfig.from_hf_dict(old) == ModelConfig.from_hf_dict(new)
    cfg = ModelConfig.from_hf_dict(old)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3"
    linear = ModelConfig.from_hf_dict({**BASE, "rope_scaling": {"rope_type": "linear", "factor": 2}})
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert ModelConfig.from_hf_dict({**BASE, "rope_scaling": {"rope_type": "default"}}).rope_scaling is None


def test_family_specifics():
    qwen = ModelConfig.from_hf_dict({**BASE, "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True,
                                     "sliding_window": 4096, "use_sliding_window": False})
    assert qwen.attention_bias and not qwen.o_proj_bias and qwen.tie_word_embeddings and qwen.sliding_window is None
    llama = ModelConfig.from_hf_dict({**BASE, "attention_bias": True})
    assert llama.attention_bias and llama.o_proj_bias
    mistral = ModelConfig.from_hf_dict({**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 16,
                                        "max_position_embeddings": 64})
    assert mistral.sliding_window == 16 and mistral.sliding_window_layers == (0, 1) and mistral.layer_window(1) == 16
    # A window as long as the model's context masks nothing: no mask at all.
    assert ModelConfig.from_hf_dict({**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 4096,
                                     "max_position_embeddings": 4096}).sliding_window is None
    by_type = ModelConfig.from_hf_dict({k: v for k, v in BASE.items() if k != "architectures"} | {"model_type": "mistral"})
    assert by_type.architecture == "MistralForCausalLM"


def test_eos_ids_from_config_and_generation_config():
    cfg = ModelConfig.from_hf_dict({**BASE, "eos_token_id": [1, 2], "bos_token_id": 0},
                                   generation_config={"eos_token_id": [2, 7]})
    assert cfg.eos_token_ids == [1, 2, 7] and cfg.bos_token_id == 0
    assert ModelConfig.from_hf_dict({**BASE, "eos_token_id": 5}).eos_token_ids == [5]


@pytest.mark.parametrize(("change", "words"), [
    ({"hidden_size": ...}, "missing key 'hidden_size'"),
    ({"num_attention_heads": 0}, "num_attention_heads must be an integer >= 1"),
    ({"vocab_size": "320"}, "vocab_size must be an integer"),
    ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads"),
    ({"hidden_size": 66}, "not divisible by num_attention_heads"),
    ({"architectures": ["GPT2LMHeadModel"]}, "architecture 'GPT2LMHeadModel' is not supported"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "missing key 'low_freq_factor'"),
    ({"rms_norm_eps": -1}, "rms_norm_eps must be a positive number"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ({"eos_token_id": 999}, "outside the vocabulary"),
])
def test_bad_config_values_are_one_line_errors_naming_the_file(change, words):
    config = {**BASE, **{k: v for k, v in change.items() if v is not ...}}
    for key in [k for k, v in change.items() if v is ...]:
        del config[key]
    with pytest.raises(LoadError) as info:
        ModelConfig.from_hf_dict(config, source="/models/x/config.json")
    assert str(info.value).startswith("/models/x/config.json: ") and words in str(info.value)
    assert "\n" not in str(info.value)


# ---- whole directories ------------------------------------------------------------------------


def test_sharded_checkpoint_loads_and_matches_transformers(tmp_path):
    hf = make_model(tmp_path, "llama", tie=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded = load(tmp_path)
    assert loaded.config.tie_word_embeddings and len(loaded.weights) == len(set(loaded.weights.names()))
    model = build_model(loaded, generated())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: one tensor
    seq = [5, 9, 200, 17, 3, 3, 100]
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model, seq), hf(torch.tensor([seq])).logits[0], atol=1e-4, rtol=0)


def test_progress_bar_over_tensors(llama_dir, capsys):
    loaded = load_model_dir(llama_dir[0], dtype="float32", device="cpu", progress=True)
    build_model(loaded, generated())
    err = capsys.readouterr().err
    assert "loading weights" in err and f"{len(loaded.weights)}/{len(loaded.weights)}" in err


def test_loaded_model_carries_tokenizer_and_merged_eos(llama_dir):
    loaded = load(llama_dir[0])
    tok = loaded.tokenizer
    eos = tok.token_to_id("</s>")
    assert eos in tok.eos_token_ids and set(loaded.config.eos_token_ids) == tok.eos_token_ids
    assert loaded.dtype == torch.float32 and loaded.config.head_dim == 16


def test_dtype_auto_and_names(llama_dir):
    assert load_model_dir(llama_dir[0], dtype="auto", progress=False).dtype == torch.float32  # the checkpoint's
    assert load_model_dir(llama_dir[0], dtype="bf16", progress=False).dtype == torch.bfloat16
    with pytest.raises(LoadError, match="unknown dtype 'int3'"):
        load_model_dir(llama_dir[0], dtype="int3", progress=False)


def test_missing_directory_and_config(tmp_path):
    assert_load_error(tmp_path / "nope", "nope", "no such model directory")
    tmp_path.joinpath("empty").mkdir()
    assert_load_error(tmp_path / "empty", "config.json", "missing")


def test_malformed_config_json(broken):
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    assert_load_error(broken, "config.json", "not valid JSON")


def test_unknown_architecture(broken):
    edit_json(broken / "config.json", architectures=["FalconForCausalLM"], model_type="falcon")
    assert_load_error(broken, "config.json", "'FalconForCausalLM' is not supported")


def test_head_dim_the_generated_attention_lacks(tmp_path):
    # head_dim 32 is not among the flash attention spec's head_dims [16, 64, 128].
    hf = make_model(tmp_path, "llama", head_dim=32)
    assert_load_error(tmp_path, "config.json", "head_dim 32 is not supported", head_dims=generated().flash_attention.HEAD_DIMS)
    assert_load_error(tmp_path, "config.json", "head_dim 32 is not supported")  # found when the model is built too
    # The reference attention (--no-flash-attn) is not compiled for head dims: it runs the model.
    model = build_model(load(tmp_path), generated(), flash_attn=False)
    seq = [4, 8, 15, 16, 23, 42]
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model, seq), hf(torch.tensor([seq])).logits[0], atol=1e-4, rtol=0)


def test_shape_mismatch_names_file_and_tensor(broken):
    edit_json(broken / "config.json", intermediate_size=96)
    message = assert_load_error(broken, "model.safetensors", "tensor model.layers.0.mlp.gate_proj.weight has shape [128, 64]")
    assert "needs [96, 64]" in message


def test_missing_tensor(broken):
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    assert_load_error(broken, "model.safetensors", "missing tensor model.layers.1.mlp.down_proj.weight")


def test_untied_config_needs_lm_head(tmp_path):
    make_model(tmp_path, "llama", tie=True)
    edit_json(tmp_path / "config.json", tie_word_embeddings=False)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    assert_load_error(tmp_path, "model.safetensors", "missing tensor lm_head.weight")


def test_missing_and_corrupt_weights(broken):
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    assert_load_error(broken, "model.safetensors", "not a valid safetensors file")
    (broken / "model.safetensors").unlink()
    assert_load_error(broken, str(broken), "no model.safetensors or model.safetensors.index.json")


def test_integer_weights_are_refused(broken):
    tensors = load_file(broken / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    assert_load_error(broken, "model.safetensors", "model.norm.weight is stored as I32")


def test_broken_shard_index(tmp_path):
    make_model(tmp_path, "llama", max_shard_size="40KB")
    index = tmp_path / "model.safetensors.index.json"
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.rename(tmp_path / "moved.safetensors")
    assert_load_error(tmp_path, shard.name, "missing (listed in model.safetensors.index.json)")
    (tmp_path / "moved.safetensors").rename(shard)
    weight_map = json.loads(index.read_text())["weight_map"]
    del weight_map["model.norm.weight"]
    edit_json(index, weight_map=weight_map)
    assert_load_error(tmp_path, "model.safetensors.index.json", "missing tensor model.norm.weight")
    index.write_text("[1, 2]")
    assert_load_error(tmp_path, "model.safetensors.index.json", "no 'weight_map'")


def test_tokenizer_files(broken):
    (broken / "tokenizer_config.json").write_text("{", encoding="utf-8")
    assert_load_error(broken, "tokenizer_config.json", "not valid JSON")
    write_tokenizer(broken, chat_template="{% for m in messages %}{{ m.content }")
    assert_load_error(broken, "tokenizer_config.json", "chat_template has a syntax error")
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": 3}', encoding="utf-8")
    assert_load_error(broken, "tokenizer.json", "not a valid tokenizer file")
    (broken / "tokenizer.json").unlink()
    assert_load_error(broken, "tokenizer.json", "missing")


def test_load_weights_checks_names_and_shapes(llama_dir):
    loaded = load(llama_dir[0])
    tensors = dict(loaded.weights)
    built = build_model(loaded, generated())
    model = LlamaForCausalLM(loaded.config, built.attention, built.ops)
    bad = {**tensors, "model.norm.weight": torch.ones(3)}
    with pytest.raises(LoadError, match=r"tensor model.norm.weight has shape \[3\], the config needs \[64\]"):
        model.load_weights(bad)
    with pytest.raises(LoadError, match="missing tensor model.embed_tokens.weight"):
        model.load_weights((k, v) for k, v in tensors.items() if k != "model.embed_tokens.weight")
    model.load_weights({**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})  # extras are skipped


# ---- tokenizer --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(llama_dir):
    return Tokenizer.from_dir(llama_dir[0])


def test_tokenizer_round_trip(tok):
    text = "Héllo wörld — paged KV cache 你好 🚀\n  def f(): pass"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == tok.token_to_id("<s>")
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False).startswith("<s>")
    assert tok.id_to_token(tok.bos_token_id) == "<s>" and tok.id_to_token(10**6) is None
    assert tok.vocab_size == 320
    assert tok.eos_token_ids == {tok.token_to_id("</s>")}
    assert {tok.token_to_id(t) for t in ("<s>", "</s>", "<|im_start|>", "<|im_end|>")} <= tok.all_special_ids


def test_add_bos_token_false_overrides_the_post_processor(tmp_path):
    write_tokenizer(tmp_path, add_bos_token=False)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)


def test_chat_template_rendering(tok):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    prompt = tok.apply_chat_template(messages)
    assert prompt == "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi\nthere<|im_end|>\n<|im_start|>assistant\n"
    assert not tok.apply_chat_template(messages, add_generation_prompt=False).endswith("assistant\n")
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids[0] == tok.bos_token_id and tok.token_to_id("<|im_start|>") in ids  # special tokens stay whole
    with pytest.raises(ChatTemplateError, match="Unknown role: robot"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])
    with pytest.raises(ChatTemplateError, match=r"messages\[0\].content\[0\]: only text parts"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(ChatTemplateError, match="must be an object with a string 'role'"):
        tok.apply_chat_template([{"content": "no role"}])


def test_chat_template_sandbox_and_extras(tmp_path):
    write_tokenizer(tmp_path, chat_template="{{ messages[0].content.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])
    template = ("{% for m in messages %}{% generation %}{{ m.content | tojson }}{% endgeneration %}{% if loop.index > 0 %}"
                "{% break %}{% endif %}{% endfor %}{{ strftime_now('%Y')[:2] }}{{ eos_token }}{{ greeting }}")
    write_tokenizer(tmp_path, chat_template=template)
    out = Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "é"}, {"role": "user", "content": "2"}],
                                                           greeting="!")
    assert out == '"é"20</s>!'


def test_chat_template_file_and_fallback(tmp_path):
    write_tokenizer(tmp_path, chat_template=None)
    tok = Tokenizer.from_dir(tmp_path)
    assert not tok.has_chat_template
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    (tmp_path / "chat_template.jinja").write_text("[{{ messages[-1]['content'] }}]", encoding="utf-8")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "Hi"}]) == "[Hi]"
