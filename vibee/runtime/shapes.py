"""Well-known model shapes run with random weights and no files: speed measurements (and load
tests of the server) need a model's shape, not its weights or its tokenizer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vibee.runtime.attention import AttentionBackend
from vibee.runtime.model import LlamaForCausalLM
from vibee.runtime.model_config import ModelConfig

if TYPE_CHECKING:
    from vibee.runtime.generated import GeneratedModules

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                         head_dim=64, tie_word_embeddings=True, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                         head_dim=128, tie_word_embeddings=False, rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}),
}


def shape_config(shape: str) -> ModelConfig:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
                       max_position_embeddings=131072, **SHAPES[shape])


def random_model(config: ModelConfig, gen: GeneratedModules, *, flash_attn: bool = True, dtype: torch.dtype, device: str,
                 seed: int = 0) -> LlamaForCausalLM:
    """The model with random weights (std 0.02, norms 1) over the generated modules (the attention's
    reference for flash_attn=False): speed does not depend on the values."""
    fa = gen.flash_attention if flash_attn else gen.flash_attention_reference
    backend = AttentionBackend(fa, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                               fuse_kv_store=gen.configs.kv_cache.fuse_kv_store)
    model = LlamaForCausalLM(config, backend, gen.decoder, dtype=dtype, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=g)
    return model.eval()


class SyntheticTokenizer:
    """The tokenizer of a shape run, whose random weights give ids no meaning. encode gives UTF-8
    bytes as ids (so a text prompt still works); decode gives an id below 128 as its ASCII
    character and any other as "<id>", so every generated token has text (a streamed response
    shows each token arrive, and `bench serve` can time the gaps between them); there is no EOS
    (generation ends at max_tokens)."""

    bos_token_id = None
    eos_token_ids: frozenset[int] = frozenset()
    all_special_ids: frozenset[int] = frozenset()

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        # Each id's text, made once: decode runs for every sequence every step.
        self._pieces = [chr(i) if i < 128 else f"<{i}>" for i in range(vocab_size)]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(map(self._pieces.__getitem__, ids))

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        return "".join(str(m.get("content", "")) for m in messages)
