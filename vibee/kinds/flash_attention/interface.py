"""What a generated flash_attention module provides to the runtime. AttentionFunctions is what
both the implementation and its reference oracle offer (the reference serves --no-flash-attn);
FlashAttentionModule adds what the engine, CUDA graphs and benchmarks read of the implementation."""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch


class AttentionFunctions(Protocol):
    """q [T, Hq, D]; k_cache, v_cache [num_pages, page_size, Hkv, D] (the page size is the cache's);
    block_tables int32 [B, pages]; cu_seqlens int32 [B+1]; seq_lens int32 [B] (KV length per
    sequence); window: a model's sliding window (0/None: none); *_host: the same lengths as host
    ints, when the caller has them (nothing is then read back from the device). Returns [T, Hq, D]."""

    def varlen_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, *, causal: bool = ..., window: int | None = ..., variants: Sequence[Any] = ...,
                         scale: float | None = ..., cu_seqlens_q_host: Sequence[int] | None = ...,
                         cu_seqlens_k_host: Sequence[int] | None = ...) -> torch.Tensor: ...

    def paged_prefill(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, *, causal: bool = ...,
                      variants: Sequence[Any] = ..., scale: float | None = ..., cu_seqlens_q_host: Sequence[int] | None = ...,
                      seq_lens_host: Sequence[int] | None = ...) -> torch.Tensor: ...

    def paged_decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, *, window: int | None = ..., variants: Sequence[Any] = ..., scale: float | None = ...) -> torch.Tensor: ...


class FlashAttentionModule(AttentionFunctions, Protocol):
    """The generated flash_attention implementation (vibee_gen/<module>.py)."""

    HEAD_DIMS: list[int]  # head dims compiled in (the loader refuses a model with another)
    COUNTERS: Any  # an AttentionCounters: work the kernels did, for /v1/inference/stats
    DEFAULT_TILE: Any  # the spec's prefill tile, a TileConfig
    AUTOTUNE_CONFIGS: list[Any]  # the prefill tiles the autotuner tries

    def TileConfig(self, block_m: int, block_n: int, num_warps: int, num_stages: int) -> Any: ...

    def num_splits_for(self, kv_len: int) -> int:
        """KV splits decode uses for a sequence of kv_len tokens (CUDA graphs fix it per capture)."""
        ...

    def paged_decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, *, window: int | None = ..., variants: Sequence[Any] = ..., scale: float | None = ...,
                     num_splits: int | None = ...) -> torch.Tensor: ...

    def paged_prefill(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, *, causal: bool = ...,
                      variants: Sequence[Any] = ..., scale: float | None = ..., tile: Any = ...,
                      cu_seqlens_q_host: Sequence[int] | None = ..., seq_lens_host: Sequence[int] | None = ...) -> torch.Tensor: ...

    def varlen_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, *, causal: bool = ..., window: int | None = ..., variants: Sequence[Any] = ...,
                         scale: float | None = ..., tile: Any = ..., cu_seqlens_q_host: Sequence[int] | None = ...,
                         cu_seqlens_k_host: Sequence[int] | None = ...) -> torch.Tensor: ...
