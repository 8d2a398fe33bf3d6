"""Checkpoints whose linear layers are already quantized, as Hugging Face saves them with a
`quantization_config` in config.json: GPTQ (AutoGPTQ / GPTQModel) and AWQ (AutoAWQ's GEMM
packing). Their tensors are unpacked into codes, scales and zero points and loaded into the
generated QuantLinear, so they run on the same kernels as weights quantized at load time.

The formats, per linear layer of [out, in] weights in groups of g inputs (G = in / g groups):

- GPTQ, b bits (4 or 8): `qweight` int32 [in * b / 32, out], the codes of 32 / b consecutive
  inputs of one output in a word, input k*(32/b) + j in bits j*b..; `qzeros` int32
  [G, out * b / 32], zero points packed the same way along the outputs, stored minus one in
  the original format (checkpoint_format "gptq"; "gptq_v2" stores them as they are);
  `scales` [G, out]; `g_idx` [in], each input's group (act-order checkpoints permute it).
  w[o, i] = (code - zero) * scale.
- AWQ (GEMM, 4 bits): `qweight` int32 [in, out / 8], eight outputs of one input in a word in
  the order 0, 2, 4, 6, 1, 3, 5, 7 (nibble k holds output AWQ_ORDER[k] of the eight); `qzeros`
  int32 [G, out / 8] packed the same way; `scales` [G, out]. w = (code - zero) * scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vibee.runtime.model_config import LoadError

QUANTIZED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass(frozen=True)
class CheckpointQuantization:
    """What a checkpoint's quantization_config says, checked."""

    method: str  # "gptq", "awq" or "gguf" (Q8_0 / Q4_0 / Q4_1 codes, gguf_file.py)
    bits: int
    group_size: int  # -1: one group per output row
    symmetric: bool  # every zero point is 2^(bits-1): the generated module's symmetric codes
    zeros_stored_minus_one: bool  # GPTQ's original format

    def knobs(self) -> dict[str, Any]:
        """The quantization knobs the generated module needs to hold these codes."""
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric, "code_type": "int"}

    def tensor_shapes(self, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        """The checkpoint tensors of one [out, in] linear layer, by suffix (g_idx is optional)."""
        groups = 1 if self.group_size == -1 else in_features // self.group_size
        per_word = 32 // self.bits
        if self.method == "gptq":
            return {"qweight": (in_features // per_word, out_features), "qzeros": (groups, out_features // per_word),
                    "scales": (groups, out_features), "g_idx": (in_features,)}
        return {"qweight": (in_features, out_features // per_word), "qzeros": (groups, out_features // per_word),
                "scales": (groups, out_features)}


def checkpoint_quantization(config: dict[str, Any], source: str) -> CheckpointQuantization | None:
    """The quantization of a config.json's checkpoint (None: float weights); LoadError for a
    format vibee does not read, saying what it would take."""
    q = config.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise LoadError(f"{source}: quantization_config is not an object")
    method = str(q.get("quant_method", "")).lower()
    if method == "gptq":
        bits, group_size = q.get("bits"), q.get("group_size", -1)
        if q.get("desc_act"):
            raise LoadError(f"{source}: GPTQ with desc_act true (act-order) is not supported; quantize with "
                            "desc_act false, or load the float model with --quant int4 --quant-method gptq")
        fmt = str(q.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise LoadError(f"{source}: GPTQ checkpoint_format {fmt!r} is not supported (gptq and gptq_v2 are)")
        if bits not in (4, 8):
            raise LoadError(f"{source}: GPTQ with {bits} bits is not supported (4 and 8 are)")
        symmetric, minus_one = bool(q.get("sym", True)), fmt == "gptq"
    elif method == "awq":
        bits, group_size = q.get("bits", q.get("w_bit")), q.get("group_size", q.get("q_group_size"))
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm":
            raise LoadError(f"{source}: AWQ version {version!r} is not supported (the GEMM packing is)")
        if bits != 4:
            raise LoadError(f"{source}: AWQ with {bits} bits is not supported (4 is)")
        symmetric, minus_one = not q.get("zero_point", True), False
    else:
        raise LoadError(f"{source}: quantization_config quant_method {q.get('quant_method')!r} is not supported "
                        "(gptq and awq are; or load float weights and quantize them with --quant)")
    if not isinstance(group_size, int) or not (group_size == -1 or (group_size >= 32 and group_size & (group_size - 1) == 0)):
        raise LoadError(f"{source}: {method} group_size {group_size!r} is not supported (a power of two from 32, or -1)")
    return CheckpointQuantization(method, bits, group_size, symmetric, minus_one)


def _fields(words: torch.Tensor, bits: int) -> torch.Tensor:
    """The bits-wide fields of int32 words, lowest first: [..., n] -> [..., n, 32 / bits]."""
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
    return (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)


def unpack_layer(q: CheckpointQuantization, tensors: dict[str, torch.Tensor], out_features: int, in_features: int,
                 where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [out, in], scales [out, G] and zero points [out, G] (codes int16, zeros int16 or, for
    GGUF Q4_1, float32; w = (code - zero) * scale) of one layer's checkpoint tensors."""
    if q.method == "gguf":  # gguf_file.py hands them over: codes [out, in], scales and zeros [out, groups]
        codes, scales, zeros = (tensors[k].contiguous() for k in ("qweight", "scales", "qzeros"))
        return codes, scales, zeros
    qweight, qzeros, scales = (tensors[k] for k in ("qweight", "qzeros", "scales"))
    groups = scales.shape[0]
    if q.method == "gptq":
        codes = _fields(qweight, q.bits).permute(0, 2, 1).reshape(in_features, out_features).T
        zeros = _fields(qzeros, q.bits).reshape(groups, out_features).T + int(q.zeros_stored_minus_one)
        g_idx = tensors.get("g_idx")
        group = in_features if q.group_size == -1 else q.group_size
        if g_idx is not None and not torch.equal(g_idx.long().cpu(), torch.arange(in_features) // group):
            raise LoadError(f"{where}.g_idx: inputs are not in group order (an act-order checkpoint); "
                            "only desc_act false GPTQ checkpoints are supported")
    else:
        order = torch.tensor(AWQ_ORDER, device=qweight.device)

        def unshuffle(words: torch.Tensor) -> torch.Tensor:  # nibble k of a word is output AWQ_ORDER[k] of its eight
            nibbles = _fields(words, 4)
            return torch.empty_like(nibbles).index_copy_(-1, order, nibbles).flatten(-2)

        codes, zeros = unshuffle(qweight).T, unshuffle(qzeros).T
    zeros = zeros.to(torch.int16)
    if q.symmetric and not bool((zeros == 1 << (q.bits - 1)).all()):
        raise LoadError(f"{where}.qzeros: the checkpoint says sym but a zero point is not {1 << (q.bits - 1)}")
    return codes.to(torch.int16).contiguous(), scales.T.contiguous(), zeros.contiguous()


def quantized_weight(quant: Any, q: CheckpointQuantization, codes: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor, dtype: torch.dtype) -> Any:
    """The generated module's QuantizedWeight for unpacked codes: symmetric codes centred on 0,
    asymmetric ones with their zero points (uint8; float32 where they are fractional)."""
    out_features, in_features = codes.shape
    group_size = in_features if q.group_size == -1 else q.group_size
    if q.symmetric:
        packed, zero_points = quant.pack_codes(codes - (1 << (q.bits - 1))), None
    else:
        fractional = zeros.is_floating_point()
        packed, zero_points = quant.pack_codes(codes), zeros.to(torch.float32 if fractional else torch.uint8)
    return quant.QuantizedWeight(packed, scales.to(dtype), zero_points, (out_features, in_features), q.bits, group_size)


def layer_parts(name: str) -> tuple[str, ...]:
    """The checkpoint layers (Hugging Face prefixes) a model linear layer holds: a merged
    projection's parts in MERGED order, or the layer itself."""
    from vibee.runtime.model import MERGED

    for merged, parts in MERGED.items():
        if name.endswith("." + merged):
            prefix = name[: -len(merged)]
            return tuple(prefix + part for part in parts)
    return (name,)


class Prequantized:
    """A checkpoint's quantized layers on their way into a model: the generated QuantLinear made in
    place of each linear layer whose parts the checkpoint quantized (replace_linear, before any
    storage), their tensors set aside as the weights stream past (take), then unpacked and loaded,
    a merged projection's parts stacked along its outputs (load_into)."""

    def __init__(self, checkpoint: CheckpointQuantization, layers: frozenset[str], quant: Any):
        self.checkpoint, self.layers, self.quant = checkpoint, layers, quant
        self.modules: dict[str, tuple[str, ...]] = {}  # model layer name -> its checkpoint layers
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}

    def replace_linear(self, name: str, linear: torch.nn.Linear) -> torch.nn.Module | None:
        parts = layer_parts(name)
        quantized = [part in self.layers for part in parts]
        if not any(quantized):
            return None
        if not all(quantized):
            raise LoadError(f"{name}: the checkpoint quantized some of {', '.join(parts)} but not all")
        self.modules[name] = parts
        return self.quant.QuantLinear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")

    def take(self, name: str, tensor: torch.Tensor) -> bool:
        prefix, _, suffix = name.rpartition(".")
        if prefix not in self.layers or suffix not in QUANTIZED_SUFFIXES:
            return False
        self.tensors.setdefault(prefix, {})[suffix] = tensor
        return True

    def load_into(self, model: torch.nn.Module, source: str) -> None:
        for name, parts in self.modules.items():
            layer = model.get_submodule(name)
            unpacked = []
            for part in parts:
                tensors = self.tensors.pop(part, {})
                if "qweight" not in tensors:
                    raise LoadError(f"{source}: missing tensor {part}.qweight")
                unpacked.append(unpack_layer(self.checkpoint, tensors, tensors["scales"].shape[1], layer.in_features, part))
            codes, scales, zeros = (torch.cat(pieces, dim=0) for pieces in zip(*unpacked))
            layer.load_quantized(quantized_weight(self.quant, self.checkpoint, codes, scales, zeros, layer.scales.dtype))
