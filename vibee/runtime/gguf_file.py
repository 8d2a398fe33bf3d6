"""GGUF model files (llama.cpp's format), read with the `gguf` package: a Llama-architecture file's
metadata as a Hugging Face config, its tokenizer and chat template, and its tensors by Hugging
Face name. Q8_0, Q4_0, Q4_1 and Q4_K tensors load as the generated int8 / int4 codes as they are,
not dequantized, in groups of 32 weights with one scale (see _codes); float tensors as floats.
Q4_1's and Q4_K's zero points are fractional: their layers load into an asymmetric module with
float32 zero points. One generated module holds one bit width: in a file with both, the width
most layers have stays codes. Tensors of the other types the `gguf` package dequantizes (Q5_0,
Q5_1, Q6_K: a Q4_0 file's output.weight is usually Q6_K, a Q4_K_M file has Q6_K layers) load
dequantized to the model's dtype, with a warning: they take that dtype's memory. So do code
layers merged with a part of another width or type (q/k/v and gate/up are one layer in vibee's
model).

llama.cpp's converter reorders each head's rows of q_proj and k_proj (RoPE's rotate-half halves
interleaved); they are put back here, a row permutation, which moves whole quantized rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from vibee.runtime.model_config import LoadError
from vibee.runtime.prequantized import CheckpointQuantization

BLOCK_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
FLOAT_TYPES = ("F32", "F16", "BF16")
# name -> bits of the codes; each group of 32 weights has one scale (and, asymmetric, a zero point)
CODE_TYPES = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4}
SYMMETRIC_TYPES = ("Q8_0", "Q4_0")  # zero point 2^(bits-1): no zero points stored
BLOCK = 32


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor name (None: not one vibee's model takes)."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.{parts[3]}"
    return None


class GGUFFile:
    """One .gguf file: `config` (a Hugging Face config dict), `quantization` (the codes' format, or
    None when every linear layer is float), `tokenizer()`, and `tensors()`."""

    def __init__(self, path: Path):
        try:
            from gguf import GGUFReader
        except ImportError:
            raise LoadError(f"{path}: reading GGUF needs the gguf package (pip install gguf)") from None
        self.path = path
        try:
            self.reader = GGUFReader(str(path))
        except Exception as err:  # the reader raises ValueError/struct errors for a file that is not GGUF
            raise LoadError(f"{path}: not a valid GGUF file ({err})") from None
        self.fields = {name: field.contents() for name, field in self.reader.fields.items()}
        arch = self.fields.get("general.architecture")
        if arch != "llama":
            raise LoadError(f"{path}: general.architecture is {arch!r}; vibee reads llama GGUF files")
        self.config = self._config()
        self.quantization = self._quantization()

    def _get(self, key: str, default: Any = ...) -> Any:
        value = self.fields.get(key, default)
        if value is ...:
            raise LoadError(f"{self.path}: missing metadata {key}")
        return value

    def _config(self) -> dict[str, Any]:
        heads = int(self._get("llama.attention.head_count"))
        hidden = int(self._get("llama.embedding_length"))
        names = {t.name for t in self.reader.tensors}
        tokens = self._get("tokenizer.ggml.tokens")
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": hidden, "intermediate_size": int(self._get("llama.feed_forward_length")),
            "num_hidden_layers": int(self._get("llama.block_count")), "num_attention_heads": heads,
            "num_key_value_heads": int(self._get("llama.attention.head_count_kv", heads)),
            "head_dim": int(self._get("llama.attention.key_length", hidden // heads)),
            "rms_norm_eps": float(self._get("llama.attention.layer_norm_rms_epsilon")),
            "rope_theta": float(self._get("llama.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._get("llama.context_length")),
            "vocab_size": len(tokens), "tie_word_embeddings": "output.weight" not in names,
            "bos_token_id": self._get("tokenizer.ggml.bos_token_id", None),
            "eos_token_id": self._get("tokenizer.ggml.eos_token_id", None),
        }

    def _quantization(self) -> CheckpointQuantization | None:
        """The codes' format; sets `code_layers`, the linear layers (Hugging Face prefixes) kept as
        codes: a layer of a code type whose merged projection's other parts (q/k/v, gate/up: one
        QuantLinear in vibee's model) are of code types with the same bit width, the width most
        layers have. Every other linear layer loads dequantized (a warning names their types)."""
        from vibee.runtime.model import MERGED

        kinds = {}  # Hugging Face prefix of each linear layer -> its GGUF type
        for t in self.reader.tensors:
            name = hf_name(t.name)
            if name is not None and name.startswith("model.layers.") and name.endswith("_proj.weight"):
                kinds[name.removesuffix(".weight")] = t.tensor_type.name
        # One generated module per bit width: the width most layers have (4 on a tie) stays codes.
        widths = [CODE_TYPES[kind] for kind in kinds.values() if kind in CODE_TYPES]
        bits = max(sorted(set(widths)), key=widths.count, default=None)
        codes = {kind for kind in kinds.values() if CODE_TYPES.get(kind) == bits}
        self.code_layers = set()
        for layer, kind in kinds.items():
            *block, leaf = layer.split(".", 3)  # "model", "layers", i; "self_attn.q_proj"
            group = next((parts for parts in MERGED.values() if leaf in parts), (leaf,))
            if kind in CODE_TYPES and all(kinds.get(".".join([*block, part])) in codes for part in group):
                self.code_layers.add(layer)
        self.code_layers = frozenset(self.code_layers)
        dequantized = sorted({kind for layer, kind in kinds.items()
                              if kind not in FLOAT_TYPES and layer not in self.code_layers})
        if dequantized:
            import logging

            logging.getLogger("vibee.loader").warning(
                "%s: linear layers stored as %s load dequantized to the model's dtype (vibee keeps Q8_0, or Q4_0, "
                "Q4_1 and Q4_K, layers as codes where every part of their merged projection is stored so)", self.path,
                ", ".join(dequantized))
        if not self.code_layers:
            return None
        kept = {kinds[layer] for layer in self.code_layers}
        # A Q4_0 layer in a file that also has asymmetric ones takes zero point 8 in the asymmetric module.
        return CheckpointQuantization("gguf", bits, BLOCK, kept <= set(SYMMETRIC_TYPES), False)

    def quantized_layers(self) -> frozenset[str]:
        """The Hugging Face prefixes of the linear layers loaded as codes."""
        return self.code_layers

    def tokenizer(self):
        """The file's tokenizer with its special tokens and chat template (gguf_tokenizer.py)."""
        from vibee.runtime.gguf_tokenizer import gguf_tokenizer

        return gguf_tokenizer(self._get, self.path)

    def tensors(self, dtype: torch.dtype, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, tensor): floats in `dtype`; the weight of a layer kept as codes
        (code_layers) as its `qweight` (codes [out, in], int16, 0..255 / 0..15), `scales` and
        `qzeros` ([out, in / 32]: fp16, and int16 or float32), w = (code - zero) * scale; any other
        quantized tensor dequantized. q/k rows back in Hugging Face's order."""
        from gguf.quants import dequantize

        heads, kv_heads = self.config["num_attention_heads"], self.config["num_key_value_heads"]
        for t in self.reader.tensors:
            name = hf_name(t.name)
            if name is None:
                continue
            out_features = int(t.shape[-1]) if len(t.shape) > 1 else None
            kind = t.tensor_type.name
            if name.removesuffix(".weight") in self.code_layers:
                parts = _codes(np.asarray(t.data), kind, out_features)
                rows = _unpermute_rows(name, heads, kv_heads, out_features)
                layer = name.removesuffix(".weight")
                for suffix, part in zip(("qweight", "scales", "qzeros"), parts):
                    yield f"{layer}.{suffix}", (part if rows is None else part[rows]).to(device)
                continue
            if kind in FLOAT_TYPES:
                array = np.asarray(t.data)
                tensor = (torch.from_numpy(array.view(np.int16).astype(np.int32) << 16).view(torch.float32)
                          if kind == "BF16" else torch.from_numpy(array.copy()))
            else:  # an embedding or lm_head in codes, or a type vibee has no kernel for: floats
                try:
                    tensor = torch.from_numpy(dequantize(np.asarray(t.data), t.tensor_type).copy())
                except NotImplementedError:
                    raise LoadError(f"{self.path}: tensor {t.name} is {kind}, which the gguf package cannot dequantize; "
                                    "vibee reads F32, F16, BF16, Q8_0, Q4_0 and Q4_1, and dequantizes the types gguf does") from None
            shape = [int(d) for d in reversed(t.shape)]  # GGUF lists the fastest dimension first
            tensor = tensor.reshape(shape)
            rows = _unpermute_rows(name, heads, kv_heads, shape[0]) if len(shape) == 2 else None
            if rows is not None:
                tensor = tensor[rows]
            yield name, tensor.to(device=device, dtype=dtype)


def _codes(blocks: np.ndarray, kind: str, out_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [out, in] (int16), scales and zero points [out, in / 32] of a code type's rows,
    w = (code - zero) * scale:
    - Q8_0: a block of 32 is an fp16 scale d and 32 int8 codes q, w = q * d (stored here + 128, zero 128);
    - Q4_0: d, then 16 bytes whose low nibbles are codes 0..15 and high nibbles 16..31, w = (q - 8) * d;
    - Q4_1: d, an fp16 minimum m, the nibbles as Q4_0's, w = q * d + m: zero -m / d in float32;
    - Q4_K: a super-block of 256 is fp16 d and dmin, 12 bytes of eight 6-bit scales s and minima
      m, and 128 bytes of nibbles (bytes 32c.. hold sub-block 2c in their low nibbles, 2c + 1 in
      their high ones); sub-block j is w = q * (d * s_j) - dmin * m_j: zero dmin * m_j / (d * s_j).
    A group whose scale is 0 is a constant (Q4_1: m; Q4_K: -dmin * m_j): codes 1, zero 0, that scale."""
    if kind == "Q4_K":
        codes, scales, minima = _q4_k(blocks.reshape(out_features, -1, 144))
    else:
        head = 4 if kind == "Q4_1" else 2
        rows = blocks.reshape(out_features, -1, head + (BLOCK if kind == "Q8_0" else BLOCK // 2))
        scales = rows[:, :, :2].copy().view(np.float16)[..., 0]
        payload = rows[:, :, head:]
        if kind == "Q8_0":
            codes = payload.view(np.int8).astype(np.int16) + 128
        else:
            codes = np.concatenate([payload & 0xF, payload >> 4], axis=-1).astype(np.int16)
        if kind != "Q4_1":
            zeros = np.full(scales.shape, 128 if kind == "Q8_0" else 8, dtype=np.int16)
            return torch.from_numpy(codes.reshape(out_features, -1)), torch.from_numpy(scales), torch.from_numpy(zeros)
        minima = -rows[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)  # w = q * d - minimum
    flat = scales == 0
    codes[flat] = 1
    with np.errstate(divide="ignore", invalid="ignore"):
        zeros = np.where(flat, 0, minima / scales.astype(np.float32)).astype(np.float32)
    scales = np.where(flat, -minima, scales.astype(np.float32)).astype(np.float32)
    return (torch.from_numpy(codes.reshape(out_features, -1)), torch.from_numpy(scales), torch.from_numpy(zeros))


def _q4_k(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K super-blocks [out, n, 144] -> codes [out, n * 8, 32] (int16) and each sub-block's
    scale d * s_j and minimum dmin * m_j [out, n * 8] (float32)."""
    out, n = rows.shape[:2]
    d = rows[..., 0:2].copy().view(np.float16).astype(np.float32)  # [out, n, 1]
    dmin = rows[..., 2:4].copy().view(np.float16).astype(np.float32)
    packed = rows[..., 4:16].astype(np.uint8)
    # Bytes 0-3 hold scales 0-3 (low 6 bits), bytes 4-7 minima 0-3; bytes 8-11 the low 4 bits of
    # scale / minimum 4-7, whose top 2 bits are the top bits of bytes 0-3 / 4-7.
    low, high, mixed = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    s = np.concatenate([low & 0x3F, (mixed & 0x0F) | ((low >> 2) & 0x30)], axis=-1).astype(np.float32)
    m = np.concatenate([high & 0x3F, (mixed >> 4) | ((high >> 2) & 0x30)], axis=-1).astype(np.float32)
    nibbles = rows[..., 16:].reshape(out, n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)
    codes = (nibbles & 0xF).astype(np.int16).reshape(out, n * 8, 32)
    return codes, (d * s).reshape(out, n * 8), (dmin * m).reshape(out, n * 8)


def _unpermute_rows(name: str, heads: int, kv_heads: int, rows: int) -> torch.Tensor | None:
    """The row order that undoes llama.cpp's q/k permutation (None for other tensors): it stored
    each head's rows as pairs (i, i + d/2) side by side; Hugging Face keeps the halves apart."""
    if name.endswith("self_attn.q_proj.weight"):
        n = heads
    elif name.endswith("self_attn.k_proj.weight"):
        n = kv_heads
    else:
        return None
    half = rows // n // 2
    # GGUF row (h, j, r) holds Hugging Face row (h, r, j): j in 0..half, r in 0..2.
    return torch.arange(rows).reshape(n, half, 2).transpose(1, 2).reshape(rows)
