"""What `vibee serve` was asked for: the flags, before the specs fill in what they leave open.

Every field left None is decided by the specs (kv_cache, continuous_batch, ...) or by the model
(max_model_len); `resolve_overrides` turns the flags that change compiled-in spec choices into
config overrides for `load_generated`, so a flag and a spec value obey the same rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vibee.runtime.generated import REPO_ROOT

DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "vibee-tiny"
DEFAULT_DRAFT_MODEL_DIR = REPO_ROOT / "models" / "vibee-tiny-draft"

DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Path | None = None  # None: the built-in default model
    shape: str | None = None  # a well-known model's shape with random weights instead of --model (vibee/runtime/shapes.py)
    served_model_name: str | None = None  # None: the model directory's name
    spec_dir: Path | None = None  # None: specs/tri
    device: str = "auto"  # auto: cuda when present, else cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: float32 on cpu, bfloat16 on cuda
    max_model_len: int | None = Field(None, ge=1)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    block_size: int | None = None
    enable_prefix_caching: bool | None = None
    max_num_seqs: int | None = Field(None, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    kv_cache: bool = True  # False: recompute every token each step (the naive baseline)
    flash_attn: bool = True  # False: the reference attention
    quant: Literal["none", "int8", "int4"] = "none"
    speculative: bool = False  # the spec's drafter (--draft-model implies it, with method draft_model)
    draft_model: Path | None = None
    num_speculative_tokens: int | None = Field(None, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    num_kv_blocks: int | None = Field(None, ge=1)  # fixes the KV cache size (tests, measurements)
    enforce_eager: bool = False  # no CUDA graphs for decode steps
    cpu_kv_cache_gib: float = Field(1.0, gt=0)  # KV cache budget on a CPU, where there is no memory to profile
    seed: int = 0  # the sampler's generator for requests without a seed

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

    def unbuilt_features(self) -> list[str]:
        """Flags whose feature the engine doesn't have yet: `vibee serve` refuses them rather
        than ignoring them."""
        problems = []
        if self.shape is not None and self.model is not None:
            problems.append("--shape and --model both name the model; give one")
        if self.num_speculative_tokens is not None and not (self.speculative or self.draft_model is not None):
            problems.append("--num-speculative-tokens needs --speculative (or --draft-model)")
        if self.tensor_parallel_size > 1:
            problems.append("tensor-parallel serving is not built yet (the generated parallel layers exist in "
                            "output/vibee_gen/igla_tensor_parallel.py); use --tensor-parallel-size 1")
        return problems

    def spec_overrides(self, dtype: str) -> dict[str, dict[str, Any]]:
        """Flags that change what the specs compile in, as {kind: {config key: value}}."""
        overrides: dict[str, dict[str, Any]] = {}
        if self.block_size is not None:
            # The attention kernels read the page size from the cache they are given.
            overrides["kv_cache"] = {"block_size": self.block_size}
        speculative: dict[str, Any] = {}
        if self.draft_model is not None:
            speculative["method"] = "draft_model"
        if self.num_speculative_tokens is not None:
            speculative["num_speculative_tokens"] = self.num_speculative_tokens
        if speculative:
            overrides["speculative_decode"] = speculative
        if self.quant != "none":
            quant: dict[str, Any] = {"compute_dtype": DTYPE_NAMES[dtype]}
            if self.quant == "int8":
                quant.update(bits=8, group_size=-1)
            else:
                quant["bits"] = 4
            overrides["quantization"] = quant
        return overrides
