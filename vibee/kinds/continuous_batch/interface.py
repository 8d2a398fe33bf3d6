"""What a generated continuous_batch module provides to the engine: the Sequence it creates per
request choice and the Scheduler that decides each step (driving the KV cache through BlockSpace)."""

from __future__ import annotations

from typing import Any, Protocol

from vibee.kinds.kv_cache.interface import BlockSpace


class Sequence(Protocol):
    seq_id: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    max_tokens: int
    num_computed_tokens: int
    status: Any  # a SequenceStatus; the engine reads status.name
    draft_token_ids: list[int]

    @property
    def num_tokens(self) -> int: ...

    @property
    def all_token_ids(self) -> list[int]: ...


class Scheduler(Protocol):
    running: list[Any]
    waiting: list[Any]

    def add(self, seq: Any) -> None: ...

    def abort(self, seq_id: int) -> Any: ...

    def finish_stopped(self, seq_id: int) -> Any: ...

    def schedule(self) -> Any:
        """A SchedulerOutput: .scheduled (seq, num_new_tokens, is_prefill, draft_token_ids), .preempted,
        .swap_out [(device block, host slot)] and .swap_in [(host slot, device block)] (copied in
        that order before the step's forward), .is_empty."""
        ...

    def update(self, output: Any, sampled: dict[int, Any]) -> list[Any]: ...

    def measured_stats(self) -> dict[str, int]: ...


class ContinuousBatchModule(Protocol):
    """The generated continuous_batch module (vibee_gen/<module>.py)."""

    def Sequence(self, seq_id: int, prompt_token_ids: list[int], max_tokens: int, *, arrival_time: float = ...,
                 stop_token_ids: frozenset[int] = ...) -> Sequence: ...

    def Scheduler(self, block_space: BlockSpace, *, policy: str, max_num_seqs: int, max_num_batched_tokens: int,
                  enable_chunked_prefill: bool, long_prefill_token_threshold: int, watermark: float,
                  preemption_mode: str, num_swap_slots: int) -> Scheduler: ...

