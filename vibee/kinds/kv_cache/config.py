"""Config of the kv_cache kind: how the paged KV cache lays out, stores and reuses blocks.
Every default lives here. kv_dtype is compiled into the generated module; block_size, prefix
caching and the memory fraction are runtime values the runtime passes to it."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import field_validator

from vibee.ir.spec import KindConfig, knob

if TYPE_CHECKING:
    from vibee.runtime.model_config import ModelConfig

MAX_BLOCK_SIZE = 256
GIB = 1 << 30

# Bytes per stored element; "auto" stores K/V in the model's activation dtype.
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "fp8": 1}
# int8 blocks carry one float32 scale per (block, kv head), for K and for V.
SCALE_BYTES = 4
# config.json's torch_dtype in kv_dtype's spelling (a model that names none runs in bf16).
_ACTIVATION = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class KVCacheConfig(KindConfig):
    KIND: ClassVar[str] = "kv_cache"
    BEHAVIORS: ClassVar[dict[str, str]] = {
        "allocate_blocks": "BlockManager.allocate: grow a sequence's block table, reusing cached prefix blocks",
        "prefix_cache_lookup": "BlockManager.num_blocks_to_allocate: how many blocks a sequence needs net of prefix-cache hits",
        "free_blocks": "BlockManager.free: release a sequence's blocks; full blocks stay cached until evicted",
        "evict_lru": "BlockManager eviction: reuse the least recently used unreferenced cached block",
        "fork_sequence": "BlockManager.fork: a new sequence sharing every block of another (ref counted)",
        "copy_on_write": "BlockManager.copy_on_write: give a sequence a private copy of its shared last block",
        "memory_stats": "BlockManager.stats: blocks in use, cached blocks and prefix-cache hit rate",
        "write_kv": "PagedKVCache.write: store new K/V at slots (block_id * block_size + offset)",
        "gather_kv": "PagedKVCache.gather: a sequence's K/V as contiguous tensors, dequantized",
        "size_cache": "num_blocks_for: how many blocks fit a memory budget at gpu_memory_utilization",
    }
    # The fields BlockManager.stats() fills in the spec's MemoryStats type (declared under `types:`;
    # the template supplies this whole type when a spec declares none). Other fields keep defaults.
    STATS_FIELDS: ClassVar[tuple[str, ...]] = (
        "num_blocks",
        "num_free_blocks",
        "num_cached_blocks",
        "usage",
        "prefix_cache_queries",
        "prefix_cache_hits",
        "hit_rate",
    )
    # What a spec test case may say; templates/test.py.j2 gives each key its meaning.
    TEST_INPUT_KEYS: ClassVar[frozenset[str]] = frozenset(
        {
            "seq_lens",  # K/V round trip: one sequence per length, written and gathered back
            "write_chunk",  # tokens per write call (1 = decode-style, token by token); default: all at once
            "prefix_len",  # prefix sharing: sequences that share this many leading tokens ...
            "suffix_lens",  # ... followed by their own suffixes of these lengths, admitted one after another
            "num_layers",  # cache shape of either kind of case; defaults 1 layer, 2 kv heads, head_dim 8
            "num_kv_heads",
            "head_dim",
            "seed",  # of the random K/V in round trips (default 0)
        }
    )
    TEST_EXPECTED_KEYS: ClassVar[frozenset[str]] = frozenset(
        {
            "max_abs_err",  # bound on |gathered - written| over every layer, K and V (absent: 0, exact)
            "hit_rate_min",  # prefix cases: the hit rate (hit blocks / looked-up full blocks) reaches this;
            # the exact hit counts are always checked against the brute-force reference
        }
    )

    block_size: int = knob("runtime", flag="--block-size",
        default=16,
        strict=True,
        description="Tokens per KV block (a power of two, 1..256): the unit of allocation, sharing and prefix caching.",
    )
    kv_dtype: Literal["auto", "fp16", "bf16", "fp32", "int8", "fp8"] = knob("compile", flag="--kv-cache-dtype",
        default="auto",
        description=("How K/V are stored: 'auto' in the activation dtype; 'int8' with a float32 scale per (block, kv head);"
                     " 'fp8' as float8 e4m3 (no scale: values saturate at +-448), read by the attention kernels directly."),
    )
    enable_prefix_caching: bool = knob("runtime", flag="--enable-prefix-caching",
        default=True,
        strict=True,
        description="Reuse the KV of full blocks whose whole token prefix matches an earlier sequence.",
    )
    fuse_kv_store: bool = knob("runtime",
        default=True,
        strict=True,
        description=("On a GPU, a layer's new K/V are stored in their pages by the kernel that makes them (RoPE's; for"
                     " one token through a quantized QKV projection, its GEMV): one kernel fewer a layer. false: the"
                     " cache's own write kernel stores them after RoPE (int8 pages, with their scales, always take it)."),
    )
    gpu_memory_utilization: float = knob("runtime", flag="--gpu-memory-utilization",
        default=0.9,
        strict=True,
        description="Fraction of device memory (0 < x <= 1) that weights, activations and the KV cache may use together.",
    )

    @field_validator("block_size")
    @classmethod
    def _block_size_is_power_of_two(cls, value: int) -> int:
        if not 1 <= value <= MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be between 1 and {MAX_BLOCK_SIZE}, got {value}")
        if value & (value - 1):
            lower = 1 << (value.bit_length() - 1)
            raise ValueError(f"block_size must be a power of two, got {value} (nearest: {lower} or {lower * 2})")
        return value

    @field_validator("gpu_memory_utilization")
    @classmethod
    def _utilization_is_a_fraction(cls, value: float) -> float:
        if not 0.0 < value <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be a fraction in (0, 1], got {value}")
        return value

    def stored_dtype(self, shape: ModelConfig) -> str:
        """The dtype K/V pages hold for a model ('auto' resolved to its activation dtype)."""
        return _ACTIVATION.get(shape.torch_dtype or "", "bf16") if self.kv_dtype == "auto" else self.kv_dtype

    def kv_bytes_per_token(self, shape: ModelConfig) -> int:
        """K and V of one token over every layer of the model, without int8 scales."""
        return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * ELEMENT_BYTES[self.stored_dtype(shape)]

    def kv_bytes_per_block(self, shape: ModelConfig) -> int:
        scales = 2 * shape.num_layers * shape.num_kv_heads * SCALE_BYTES if self.kv_dtype == "int8" else 0
        return self.kv_bytes_per_token(shape) * self.block_size + scales

    def derived(self, shape: ModelConfig) -> dict[str, str]:
        per_block = self.kv_bytes_per_block(shape)
        blocks_per_gib = GIB // per_block
        return {
            "model": f"{shape.num_layers} layers x {shape.num_kv_heads} kv heads x head_dim {shape.head_dim}",
            "stored kv dtype": self.stored_dtype(shape) + (" (kv_dtype auto)" if self.kv_dtype == "auto" else ""),
            "kv bytes per token": f"{per_block / self.block_size:,.1f}".removesuffix(".0"),
            "kv bytes per block": f"{per_block:,} ({self.block_size} tokens)",
            "tokens per GiB": f"{blocks_per_gib * self.block_size:,} ({blocks_per_gib:,} blocks)",
        }
