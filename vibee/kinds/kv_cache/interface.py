"""What a generated kv_cache module provides. BlockSpace is what the scheduler (continuous_batch)
needs of the block manager: generated code imports it, so the two generated files never import
each other. KVCacheModule is what the runtime (engine, model runner, benchmarks) uses."""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch


class BlockSpace(Protocol):
    """What the scheduler needs from the paged KV cache; kv_cache's BlockManager implements it."""

    block_size: int

    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, or cached-but-unreferenced and evictable)."""
        ...

    def num_blocks_to_allocate(self, seq_id: int, token_ids: Sequence[int], num_lookahead: int = 0) -> int:
        """Blocks `allocate(seq_id, token_ids, num_lookahead)` would newly take, net of prefix-cache hits."""
        ...

    def allocate(self, seq_id: int, token_ids: Sequence[int], num_lookahead: int = 0) -> int:
        """Grow seq_id's block table to cover token_ids (all of the sequence's tokens so far) plus
        num_lookahead slots for speculative tokens, which are not recorded or prefix-cached.
        Returns how many leading tokens already have their KV in the prefix cache (0 without
        prefix caching). Raises MemoryError when there are not enough blocks; nothing changes then."""
        ...

    def free(self, seq_id: int) -> None:
        """Release every block of seq_id (cached full blocks stay reusable until evicted). The
        blocks' K/V is left as it is: a block handed to another sequence is first written by a
        later forward, so a copy queued before that forward (a swap-out of block_table(seq_id),
        taken just before free) still reads what seq_id left there."""
        ...

    def block_table(self, seq_id: int) -> list[int]:
        ...


class BlockManager(BlockSpace, Protocol):
    """The engine's view of the generated BlockManager: BlockSpace plus what it reports."""

    block_tables: dict[int, list[int]]  # seq_id -> block ids, the lists the engine mirrors

    def set_tokens(self, seq_id: int, index: int, tokens: Sequence[int]) -> None:
        """Record the sampled tokens in place of the placeholders recorded from index on."""
        ...

    def stats(self) -> Any:
        """A MemoryStats: num_free_blocks, num_cached_blocks, usage, prefix_cache_queries/hits, hit_rate."""
        ...


class PagedKVCache(Protocol):
    """Paged K/V of every layer: k_pages[layer].data is [num_blocks, block_size, kv_heads, head_dim]
    (int8 pages also carry .scale)."""

    block_size: int
    k_pages: list[Any]
    v_pages: list[Any]

    def bytes_per_block(self) -> int: ...

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None: ...


class HostKVSwap(Protocol):
    """Host slots for the KV blocks of swapped-out sequences (preemption_mode swap)."""

    num_slots: int

    def swap_out(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Queue copies of (device block, host slot) pairs."""
        ...

    def swap_in(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Queue copies of (host slot, device block) pairs."""
        ...


class KVCacheModule(Protocol):
    """The generated kv_cache module (vibee_gen/<module>.py)."""

    KV_DTYPE: str  # how pages store K/V (compile-time: "auto", "int8", ...)

    def BlockManager(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> BlockManager: ...

    def PagedKVCache(self, num_layers: int, num_blocks: int, num_kv_heads: int, head_dim: int, *,
                     dtype: torch.dtype, device: torch.device | str, block_size: int) -> PagedKVCache: ...

    def HostKVSwap(self, cache: PagedKVCache, num_slots: int) -> HostKVSwap: ...
