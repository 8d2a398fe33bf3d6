"""The one list of kinds. A kind is one folder, vibee/kinds/<kind>/:

  config.py     its config model (a KindConfig: every knob, its default and its checks)
  interface.py  the typing Protocol its generated module satisfies (what the runtime may use)
  templates/    torch.py.j2, reference.py.j2, test.py.j2 and, for kinds with GPU kernels, triton.py.j2

Adding a kind is adding a folder and a line here."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from vibee.ir.spec import KindConfig

KINDS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Kind:
    name: str
    config_class: str  # the KindConfig subclass in vibee/kinds/<name>/config.py
    # Kinds with GPU kernels of their own generate a triton.py.j2 implementation; the others
    # (scheduler, drafters and verifiers, tensor-parallel layers) are host or torch.distributed
    # code whose torch template serves both targets.
    has_kernels: bool = False

    @property
    def folder(self) -> Path:
        return KINDS_DIR / self.name

    @property
    def templates(self) -> Path:
        return self.folder / "templates"

    @cached_property
    def config(self) -> type[KindConfig]:
        return getattr(importlib.import_module(f"vibee.kinds.{self.name}.config"), self.config_class)

    def implementation_template(self, target: str) -> str:
        return f"{self.name}/{target if self.has_kernels else 'torch'}.py.j2"


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("kv_cache", "KVCacheConfig", has_kernels=True),
        Kind("flash_attention", "FlashAttentionConfig", has_kernels=True),
        Kind("quantization", "QuantizationConfig", has_kernels=True),
        Kind("speculative_decode", "SpeculativeDecodeConfig"),
        Kind("continuous_batch", "ContinuousBatchConfig"),
        Kind("tensor_parallel", "TensorParallelConfig"),
        Kind("decoder", "DecoderConfig", has_kernels=True),
    )
}
KIND_NAMES = tuple(KINDS)


def config_model(kind: str) -> type[KindConfig]:
    return KINDS[kind].config
