"""The two tiny Llamas: their configs, building them for training, and their files in Hugging Face layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .tokenizer import EOT, IM_END, IM_START, tokenizer_config

TARGET_NAME = "vibee-tiny"
DRAFT_NAME = "vibee-tiny-draft"
MAX_TOTAL_BYTES = 30 * 1000 * 1000  # the "30 MB at most in all"
MAX_LEN = 1024  # max_position_embeddings and model_max_length


def llama_config(vocab_size: int, hidden: int, heads: int, kv_heads: int, layers: int,
                 intermediate: int, max_len: int) -> dict:
    """A config.json in the long-standing Llama layout (rope_theta, torch_dtype), written by hand so
    the files do not depend on which transformers version trained them."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_len,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }


def build_model(config: dict, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")})
    return LlamaForCausalLM(hf_config).to(device=device, dtype=torch.float32)


def add_training_dropout(model, p: float) -> None:
    """Dropout on the embeddings and on each attention and MLP output before it joins the residual
    stream, in training mode only. The stdlib is small enough that the target learns it by heart
    otherwise. Done with forward hooks, so the saved model is a plain Llama."""
    if p <= 0:
        return

    def drop(module, inputs, output):
        if not module.training:
            return output
        if isinstance(output, tuple):  # attention returns (output, weights)
            return (F.dropout(output[0], p, True), *output[1:])
        return F.dropout(output, p, True)

    model.model.embed_tokens.register_forward_hook(drop)
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(drop)
        layer.mlp.register_forward_hook(drop)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are one parameter


def save_model(model, config: dict, tokenizer, out: Path, max_len: int) -> None:
    """config.json + model.safetensors (bf16) + tokenizer files + generation_config.json."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {
        name: tensor.detach().to(torch.bfloat16).contiguous().cpu()
        for name, tensor in model.state_dict().items()
        if not (name == "lm_head.weight" and config["tie_word_embeddings"])
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": [0, 2], "pad_token_id": 0}, indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(max_len), indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT,
         "additional_special_tokens": [IM_START, IM_END]}, indent=2) + "\n")


def load_saved(path: Path, device: str):
    """The saved bf16 weights, loaded back with transformers and cast to fp32 (exact)."""
    from transformers import LlamaForCausalLM

    model, info = LlamaForCausalLM.from_pretrained(str(path), output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise RuntimeError(f"{path}: transformers could not load every weight: {problems}")
    return model.to(device=device, dtype=torch.float32).eval()


def logits_of(model, inputs: torch.Tensor) -> torch.Tensor:
    return model(input_ids=inputs.clamp(min=0), use_cache=False).logits.float()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
