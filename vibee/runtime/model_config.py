"""The model's shape and numerics, read from a Hugging Face `config.json` (+ `generation_config.json`).

Both config layouts are read: the older one (`rope_theta` and `rope_scaling` at the top level,
`torch_dtype`) and the transformers 5 one (`rope_parameters` holding the theta and the scaling,
`dtype`). Everything a user's file can get wrong is a `LoadError("<file>: <problem>")`.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict


class LoadError(Exception):
    """A model directory that can't be served: the message is one line naming the file and the problem."""


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# Configs written without `architectures` still name their family.
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# transformers' class defaults for keys a config may leave out.
_DEFAULT_MAX_POSITIONS = {"LlamaForCausalLM": 2048, "MistralForCausalLM": 4096 * 32, "Qwen2ForCausalLM": 32768}
# RoPE types and the keys each needs besides `factor`.
ROPE_TYPES = {"default": (), "linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                               "original_max_position_embeddings"), "yarn": ("factor",)}


class ModelConfig(BaseModel):
    """What the runtime needs to build and run a Llama-family decoder."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None  # None: plain RoPE; else has "rope_type" (linear, llama3, yarn)
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections have a bias (Qwen2; Llama with attention_bias)
    o_proj_bias: bool = False  # o_proj has a bias (Llama with attention_bias; never Qwen2)
    mlp_bias: bool = False  # gate/up/down have biases (Llama's mlp_bias)
    sliding_window: int | None = None  # attention window of the layers in sliding_window_layers
    sliding_window_layers: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: list[int] = []
    pad_token_id: int | None = None
    torch_dtype: str | None = None

    @classmethod
    def from_hf_dict(cls, d: Any, source: str = "config.json", generation_config: dict | None = None,
                     generation_source: str = "generation_config.json") -> "ModelConfig":
        """Read a parsed config.json; `generation_config` (a parsed generation_config.json) adds
        its eos ids. Raises LoadError naming `source` (or `generation_source`)."""
        return _Reader(d, source).build(generation_config, generation_source)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer, None when it attends to the whole sequence."""
        return self.sliding_window if layer in self.sliding_window_layers else None


class _Reader:
    """Reads and checks one config dict, every error naming the file."""

    def __init__(self, d: Any, source: str):
        self.source = source
        if not isinstance(d, dict):
            self.fail(f"expected a JSON object, got {type(d).__name__}")
        self.d = d

    def fail(self, problem: str):
        raise LoadError(f"{self.source}: {problem}")

    def _lookup(self, key: str, default: Any, d: dict | None) -> tuple[bool, Any]:
        """(True, d[key]), or (False, default) when the key is absent or null; with no default
        (...) a missing key is a LoadError."""
        d = self.d if d is None else d
        if d.get(key) is None:
            if default is ...:
                self.fail(f"missing key {key!r}")
            return False, default
        return True, d[key]

    def get_int(self, key: str, default: Any = ..., *, minimum: int = 1, d: dict | None = None) -> int:
        found, value = self._lookup(key, default, d)
        if not found:
            return value
        # JSON has one number type: 4096.0 is accepted as 4096, 4096.5 is not.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(f"{key} must be an integer >= {minimum}, got {value!r}")
        return value

    def get_float(self, key: str, default: Any = ..., *, d: dict | None = None, positive: bool = True) -> float:
        found, value = self._lookup(key, default, d)
        if not found:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (positive and value <= 0):
            self.fail(f"{key} must be a {'positive ' if positive else ''}number, got {value!r}")
        return float(value)

    def get_bool(self, key: str, default: bool) -> bool:
        value = self.d.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(f"{key} must be true or false, got {value!r}")
        return value

    def token_ids(self, key: str, d: dict, source: str) -> list[int]:
        """An id, a list of ids or null."""
        value = d.get(key)
        if value is None:
            return []
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise LoadError(f"{source}: {key} must be a token id or a list of token ids, got {value!r}")
        return list(values)

    def architecture(self) -> str:
        archs = self.d.get("architectures")
        if archs is not None:
            if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
                self.fail(f"architectures must be a non-empty list of names, got {archs!r}")
            for arch in archs:
                if arch in SUPPORTED_ARCHITECTURES:
                    return arch
            self.fail(f"architecture {archs[0]!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        model_type = self.d.get("model_type")
        if model_type in _MODEL_TYPES:
            return _MODEL_TYPES[model_type]
        self.fail(f"no supported 'architectures' entry or model_type (got model_type {model_type!r}; "
                  f"supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    def rope(self, head_dim: int, max_positions: int) -> tuple[float, dict | None]:
        params = self.d.get("rope_parameters")
        key = "rope_parameters"
        if params is None:
            params, key = self.d.get("rope_scaling"), "rope_scaling"
        params = {} if params is None else params
        if not isinstance(params, dict):
            self.fail(f"{key} must be an object or null, got {params!r}")
        if params and all(isinstance(v, dict) for v in params.values()):
            self.fail(f"{key}: per-layer-type RoPE parameters are not supported")
        theta = self.get_float("rope_theta", None, d=params)
        if theta is None:
            theta = self.get_float("rope_theta", 10000.0)
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            self.fail(f"{key}: rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        partial = params.get("partial_rotary_factor", self.d.get("partial_rotary_factor", 1.0))
        if partial not in (1, 1.0, None):
            self.fail(f"partial_rotary_factor {partial!r} is not supported (only 1.0)")
        if rope_type == "default":
            return theta, None
        scaling = {k: v for k, v in params.items() if k not in ("type", "rope_theta", "partial_rotary_factor")}
        scaling["rope_type"] = rope_type
        for name in ROPE_TYPES[rope_type]:
            if params.get(name) is None:
                self.fail(f"{key}: missing key {name!r} for rope type {rope_type!r}")
            is_length = name == "original_max_position_embeddings"
            scaling[name] = self.get_int(name, d=params) if is_length else self.get_float(name, d=params)
        if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            self.fail(f"{key}: high_freq_factor must be larger than low_freq_factor")
        if rope_type == "yarn":
            # transformers' rule: the pretraining length, from the config's own key when present.
            orig = self.d.get("original_max_position_embeddings", params.get("original_max_position_embeddings", max_positions))
            scaling["original_max_position_embeddings"] = self.get_int("original_max_position_embeddings", orig,
                                                                   d={"original_max_position_embeddings": orig})
            for name in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
                if params.get(name) is not None:
                    scaling[name] = self.get_float(name, d=params, positive=False)
            scaling["truncate"] = bool(params.get("truncate", True))
        return theta, scaling

    def sliding_window(self, arch: str, num_layers: int, max_positions: int) -> tuple[int | None, tuple[int, ...]]:
        window = self.d.get("sliding_window")
        if window is None:
            return None, ()
        window = self.get_int("sliding_window")
        if arch == "Qwen2ForCausalLM" and not self.get_bool("use_sliding_window", False):
            return None, ()
        layer_types = self.d.get("layer_types")
        if layer_types is not None:
            if not isinstance(layer_types, list) or len(layer_types) != num_layers:
                self.fail(f"layer_types must list one type per layer ({num_layers}), got {layer_types!r}")
            layers = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
        elif arch == "Qwen2ForCausalLM":
            first = self.get_int("max_window_layers", 28, minimum=0)
            layers = tuple(range(first, num_layers))
        else:
            layers = tuple(range(num_layers))
        # A window no sequence can outgrow changes nothing: skip the mask.
        if window >= max_positions or not layers:
            return None, ()
        return window, layers

    def build(self, generation_config: dict | None, generation_source: str) -> ModelConfig:
        arch = self.architecture()
        act = self.d.get("hidden_act", self.d.get("hidden_activation", "silu"))
        if act not in ("silu", "swish"):
            self.fail(f"hidden_act {act!r} is not supported (Llama-family models use 'silu')")
        hidden = self.get_int("hidden_size")
        heads = self.get_int("num_attention_heads")
        kv_heads = self.get_int("num_key_value_heads", heads)
        if heads % kv_heads:
            self.fail(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
        head_dim = self.get_int("head_dim", None)
        if head_dim is None:
            if hidden % heads:
                self.fail(f"hidden_size ({hidden}) is not divisible by num_attention_heads ({heads}) and there is no head_dim")
            head_dim = hidden // heads
        if head_dim % 2:
            self.fail(f"head_dim must be even for RoPE, got {head_dim}")
        num_layers = self.get_int("num_hidden_layers")
        max_positions = self.get_int("max_position_embeddings", _DEFAULT_MAX_POSITIONS[arch])
        theta, scaling = self.rope(head_dim, max_positions)
        window, window_layers = self.sliding_window(arch, num_layers, max_positions)
        if arch == "Qwen2ForCausalLM":
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif arch == "MistralForCausalLM":
            qkv_bias = o_bias = mlp_bias = False
        else:
            qkv_bias = o_bias = self.get_bool("attention_bias", False)
            mlp_bias = self.get_bool("mlp_bias", False)
        eos = self.token_ids("eos_token_id", self.d, self.source)
        if generation_config is not None:
            if not isinstance(generation_config, dict):
                raise LoadError(f"{generation_source}: expected a JSON object, got {type(generation_config).__name__}")
            eos += [t for t in self.token_ids("eos_token_id", generation_config, generation_source) if t not in eos]
        bos = self.token_ids("bos_token_id", self.d, self.source)
        pad = self.token_ids("pad_token_id", self.d, self.source)
        vocab = self.get_int("vocab_size")
        for name, ids in (("eos_token_id", eos), ("bos_token_id", bos), ("pad_token_id", pad)):
            if any(t >= vocab for t in ids):
                self.fail(f"{name} {ids} is outside the vocabulary of {vocab} tokens")
        dtype = self.d.get("torch_dtype", self.d.get("dtype"))
        return ModelConfig(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=self.get_int("intermediate_size"),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=self.get_float("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_positions,
            tie_word_embeddings=self.get_bool("tie_word_embeddings", False),
            attention_bias=qkv_bias,
            o_proj_bias=o_bias,
            mlp_bias=mlp_bias,
            sliding_window=window,
            sliding_window_layers=window_layers,
            bos_token_id=bos[0] if bos else None,
            eos_token_ids=eos,
            pad_token_id=pad[0] if pad else None,
            torch_dtype=dtype if isinstance(dtype, str) else None,
        )
