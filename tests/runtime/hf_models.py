"""Tiny random Hugging Face models for the runtime tests, written the way real ones are shipped:
`save_pretrained` safetensors (optionally sharded), a byte-level BPE tokenizer.json trained here
in milliseconds, and a tokenizer_config.json with a chat template."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A paged KV cache keeps keys and values in fixed-size blocks.",
    "Continuous batching lets new requests join a running batch at every step.",
    "Flash attention never materialises the full attention matrix.",
    "Speculative decoding drafts tokens cheaply and verifies them in one pass.",
    "Héllo wörld, naïve café — unicode text must round trip: 你好, 世界! 🚀",
    "def add(a, b):\n    return a + b\n",
] * 4

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 320

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@functools.lru_cache(maxsize=None)
def generated():
    """The generated modules the runtime runs on (the one switch for how tests import them)."""
    from vibee.runtime.generated import load_generated

    return load_generated()


def train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    # Llama-style: BOS in front of every encoded text.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


@functools.lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    return train_tokenizer().to_str()


def write_tokenizer(model_dir: Path, chat_template: str | None = CHAT_TEMPLATE, **config: Any) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "tokenizer.json").write_text(_tokenizer_json(), encoding="utf-8")
    cfg = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "unk_token": "<unk>",
           "tokenizer_class": "PreTrainedTokenizerFast", **config}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")


def hf_config(arch: str = "llama", *, hidden: int = 64, heads: int = 4, kv_heads: int = 2, head_dim: int | None = None,
              layers: int = 2, tie: bool = False, rope: dict | None = None, **extra: Any):
    """A transformers config of a tiny model; rope: rope_parameters (theta and scaling)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    kwargs: dict[str, Any] = dict(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
                                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                  max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                                  bos_token_id=0, eos_token_id=1, initializer_range=0.1,
                                  rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0})
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    kwargs.update(extra)
    return cls(**kwargs)


def make_model(model_dir: Path, arch: str = "llama", *, seed: int = 0, max_shard_size: str | None = None,
               chat_template: str | None = CHAT_TEMPLATE, **config: Any):
    """Write a random model + tokenizer to model_dir; returns the transformers model (float32, eval)."""
    from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

    cls = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM}[arch]
    torch.manual_seed(seed)
    model = cls(hf_config(arch, **config)).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(model_dir, safe_serialization=True, **kwargs)
    write_tokenizer(model_dir, chat_template)
    return model


def edit_json(path: Path, **changes: Any) -> None:
    """Set (or, with value ..., delete) top-level keys of a JSON file."""
    data = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def model_cache(tmp_path_factory, variants: dict[str, tuple[str, dict]]):
    """get(name) -> (model dir, transformers model) of variants[name] = (arch, make_model kwargs),
    each built once (the tests of a module share them)."""
    cache = {}

    def get(name):
        if name not in cache:
            arch, config = variants[name]
            model_dir = tmp_path_factory.mktemp(name)
            cache[name] = (model_dir, make_model(model_dir, arch, **config))
        return cache[name]

    return get
