"""What a generated speculative_decode module provides to the engine: the drafters it builds, the
verifiers of a speculative step and the acceptance tracker behind /v1/inference/stats."""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import torch


class NgramDrafter(Protocol):
    def propose(self, token_ids: Sequence[int]) -> list[int]: ...


class DraftModelDrafter(Protocol):
    def propose(self, batch_token_ids: Sequence[Sequence[int]], temperature: float = ...,
                generator: torch.Generator | None = ...) -> tuple[torch.Tensor, torch.Tensor]: ...


class AcceptanceTracker(Protocol):
    def reset(self) -> None: ...

    def update(self, num_draft_tokens: Any, num_accepted: Any) -> None: ...

    def figures(self) -> dict[str, Any]: ...


class SpeculativeDecodeModule(Protocol):
    """The generated speculative_decode module (vibee_gen/<module>.py)."""

    def speculation_enabled(self, batch_size: int, disable_by_batch_size: int | None) -> bool: ...

    def NgramDrafter(self, num_speculative_tokens: int, min_n: int, max_n: int) -> NgramDrafter: ...

    def DraftModelDrafter(self, model_fn: Callable[[list[list[int]]], torch.Tensor],
                          num_speculative_tokens: int) -> DraftModelDrafter: ...

    def AcceptanceTracker(self, num_speculative_tokens: int) -> AcceptanceTracker: ...

    def greedy_accept(self, draft_tokens: Sequence[int], target_tokens: Sequence[int]) -> list[int]: ...

    def greedy_verify(self, draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[list[list[int]], torch.Tensor]: ...

    def rejection_sample(self, draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None, target_probs: torch.Tensor,
                         generator: torch.Generator | None = ...) -> tuple[list[list[int]], torch.Tensor]: ...
