"""What `vibee serve` was asked for: the engine's own settings, and the knob settings of the
flags as {kind: {config field: value}}.

A knob (block size, max_num_seqs, ...) is declared once, in its kind's config model; its flag
comes from there (vibee/engine_flags.py) and its setting goes to `load_generated`, which applies
it to the spec's values under the model's rules. Settings here are the engine's alone: which
model, where, in what dtype, and the switches for measurements (the naive baselines, eager mode).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vibee.runtime.generated import REPO_ROOT

DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "vibee-tiny"
DEFAULT_DRAFT_MODEL_DIR = REPO_ROOT / "models" / "vibee-tiny-draft"
MEDUSA_HEADS_FILE = "medusa_heads.safetensors"  # in a model's directory: its Medusa heads (scripts/train_medusa_heads.py)

DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# What --quant sets in the quantization spec (the spec decides the rest).
QUANT_KNOBS = {"int8": {"bits": 8, "code_type": "int"}, "int4": {"bits": 4, "code_type": "int"},
               "fp8": {"bits": 8, "code_type": "fp8"}}


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Path | None = None  # None: the built-in default model
    shape: str | None = None  # a well-known model's shape with random weights instead of --model (vibee/runtime/shapes.py)
    served_model_name: str | None = None  # None: the model directory's name
    spec_dir: Path | None = None  # None: specs/tri
    device: str = "auto"  # auto: cuda when present, else cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: float32 on cpu, bfloat16 on cuda
    max_model_len: int | None = Field(None, ge=1)
    kv_cache: bool = True  # False: recompute every token each step (the naive baseline)
    flash_attn: bool = True  # False: the reference attention
    quant: Literal["none", "int8", "int4", "fp8"] = "none"
    speculative: bool = False  # the spec's drafter (--draft-model, --speculative-method and --medusa-heads imply it)
    draft_model: Path | None = None
    num_kv_blocks: int | None = Field(None, ge=1)  # fixes the KV cache size (tests, measurements)
    enforce_eager: bool = False  # no CUDA graphs for decode steps
    cpu_kv_cache_gib: float = Field(1.0, gt=0)  # KV cache budget on a CPU, where there is no memory to profile
    seed: int = 0  # the sampler's generator for requests without a seed
    knobs: dict[str, dict[str, Any]] = {}  # {kind: {config field: value}} set by flags; the specs decide the rest

    @property
    def model_dir(self) -> Path:
        return self.model if self.model is not None else DEFAULT_MODEL_DIR

    @property
    def model_source(self) -> str:
        """What the engine runs, for people: a directory, or a shape's random weights."""
        return f"{self.shape} (random weights)" if self.shape else str(self.model_dir)

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return self.shape if self.shape else self.model_dir.resolve().name

    def resolve_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolve_dtype(self, device: str) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if device.startswith("cuda") else "float32"

    def knob(self, kind: str, field: str) -> Any:
        """A knob's setting from the flags, or None when the spec decides."""
        return self.knobs.get(kind, {}).get(field)

    @property
    def speculating(self) -> bool:
        """Whether the engine drafts: --speculative, or a flag that names a drafter."""
        return (self.speculative or self.draft_model is not None
                or self.knob("speculative_decode", "method") is not None
                or self.knob("speculative_decode", "medusa_heads") is not None)

    def unbuilt_features(self) -> list[str]:
        """Flags whose feature the engine doesn't have yet: `vibee serve` refuses them rather
        than ignoring them."""
        problems = []
        if self.shape is not None and self.model is not None:
            problems.append("--shape and --model both name the model; give one")
        if self.knob("speculative_decode", "num_speculative_tokens") is not None and not self.speculating:
            problems.append("--num-speculative-tokens needs --speculative (or --draft-model)")
        method = self.knob("speculative_decode", "method")
        if self.draft_model is not None and method not in (None, "draft_model"):
            problems.append(f"--draft-model drafts with a model; it can't go with --speculative-method {method}")
        if self.knob("speculative_decode", "medusa_heads") is not None and method not in (None, "medusa"):
            problems.append(f"--medusa-heads is for --speculative-method medusa, not {method}")
        checkpoint = self.checkpoint_quantization()
        if checkpoint is not None and (self.quant != "none" or self.knobs.get("quantization")):
            problems.append(f"{self.model_dir} is a {checkpoint.method} int{checkpoint.bits} checkpoint: its codes are "
                            "used as they are; drop --quant, --group-size and --quant-method")
        elif self.knobs.get("quantization") and self.quant == "none":
            problems.append("--group-size and --quant-method shape the quantized weights; they need --quant int4 or int8")
        elif self.quant == "fp8" and self.knobs.get("quantization"):
            problems.append("--quant fp8 has one format (e4m3 codes, one scale per output channel, round to nearest): "
                            "drop --group-size and --quant-method")
        return problems

    def checkpoint_quantization(self):
        """The model's pre-quantized format (GPTQ, AWQ from a directory's config.json; Q8_0/Q4_0/Q4_1 of a
        .gguf file), or None (float weights, a --shape run, or nothing readable yet: the loader reports that)."""
        from vibee.runtime.prequantized import checkpoint_quantization
        from vibee.runtime.tokenizer import read_json

        if self.shape is None and self.model_dir.suffix == ".gguf" and self.model_dir.is_file():
            from vibee.runtime.gguf_file import GGUFFile

            return GGUFFile(self.model_dir).quantization
        path = self.model_dir / "config.json"
        if self.shape is not None or not path.is_file():
            return None
        return checkpoint_quantization(read_json(path), str(path))

    def knob_settings(self, dtype: str) -> dict[str, dict[str, Any]]:
        """The knob settings load_generated applies: the flags', plus what --quant,
        --draft-model and --medusa-heads choose. Values the model derives (int8's per-channel groups) are left to it."""
        settings = {kind: dict(values) for kind, values in self.knobs.items()}
        if self.draft_model is not None:
            settings.setdefault("speculative_decode", {})["method"] = "draft_model"
        elif self.knob("speculative_decode", "medusa_heads") is not None:
            settings.setdefault("speculative_decode", {}).setdefault("method", "medusa")
        checkpoint = self.checkpoint_quantization()
        if self.quant != "none" or checkpoint is not None:
            quantization = settings.setdefault("quantization", {})
            if checkpoint is not None:  # a GPTQ/AWQ checkpoint: the generated module holds its format
                quantization.update(checkpoint.knobs())
            else:
                quantization.update(QUANT_KNOBS[self.quant])
            # A 16-bit model's quantized layers compute in its dtype; a float32 one's keep the spec's
            # (bf16 unless it says otherwise): torch's CPU int4/int8 kernels run 10-60x slower in float32.
            if dtype != "float32":
                quantization["compute_dtype"] = DTYPE_NAMES[dtype]
        return settings
