"""Proposers of device rounds' drafts (device_rounds.py): what each round verifies. A proposer
drafts on the device from the sequences' tokens kept there; the draft model's is draft_rounds.py,
which also keeps state per sequence (before/after/forget); these keep none."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class StatelessProposer:
    """A proposer that keeps nothing per sequence: no catch-up before a step's rounds, nothing to
    learn after them or to forget."""

    def before(self, seqs: list[Any], tables: np.ndarray) -> int:
        return 0

    def after(self, seqs: list[Any], emitted: list[list[int]]) -> None:
        pass

    def forget(self, seq_id: int) -> None:
        pass


class NgramProposer(StatelessProposer):
    """A round's drafts by n-gram lookup in each sequence's tokens (the generated kernel)."""

    def __init__(self, sd_module: Any, drafter: Any):
        self.sd, self.drafter = sd_module, drafter

    def propose(self, work: torch.Tensor, lens: torch.Tensor, limits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sd.ngram_propose_on_device(self.drafter, work, lens)


class PlainProposer(StatelessProposer):
    """No drafts (k = 0): a round is one decode step of every sequence, its token sampled on the
    device (vibee/runtime/multi_step.py)."""

    def __init__(self, max_rows: int, device: str):
        self.drafts = torch.zeros(max_rows, 0, dtype=torch.long, device=device)
        self.counts = torch.zeros(max_rows, dtype=torch.long, device=device)

    def propose(self, work: torch.Tensor, lens: torch.Tensor, limits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.drafts[: len(lens)], self.counts[: len(lens)]
