"""The six kinds and their config models. A kind's model lives in vibee/ir/<kind>.py."""

from __future__ import annotations

import importlib

from vibee.ir.spec import KindConfig

KIND_CONFIGS = {
    "kv_cache": ("vibee.ir.kv_cache", "KVCacheConfig"),
    "flash_attention": ("vibee.ir.flash_attention", "FlashAttentionConfig"),
    "quantization": ("vibee.ir.quantization", "QuantizationConfig"),
    "speculative_decode": ("vibee.ir.speculative_decode", "SpeculativeDecodeConfig"),
    "continuous_batch": ("vibee.ir.continuous_batch", "ContinuousBatchConfig"),
    "tensor_parallel": ("vibee.ir.tensor_parallel", "TensorParallelConfig"),
}
KIND_NAMES = tuple(KIND_CONFIGS)
# Kinds whose triton target has GPU kernels of its own. The others (scheduler, drafters and
# verifiers, tensor-parallel layers) are host or torch.distributed code: both targets share
# their torch template.
KINDS_WITH_KERNELS = ("kv_cache", "flash_attention", "quantization")


def config_model(kind: str) -> type[KindConfig]:
    module, name = KIND_CONFIGS[kind]
    return getattr(importlib.import_module(module), name)
