"""Interfaces between generated modules that no spec changes. Generated code imports these so
that, e.g., the scheduler (continuous_batch) can drive the paged KV cache (kv_cache) without the
two generated files importing each other."""

from __future__ import annotations

from typing import Protocol, Sequence


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
        """Release every block of seq_id (cached full blocks stay reusable until evicted)."""
        ...

    def block_table(self, seq_id: int) -> list[int]:
        ...
