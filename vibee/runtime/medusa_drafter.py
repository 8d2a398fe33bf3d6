"""Medusa drafting in the engine: the spec's generated MedusaHeads, run on the target's final hidden
states that the model runner kept from the last step.

A sequence's drafts for the next step come from the hidden state at its last verified position of
the step that just ran: the target's own logits there gave the token the sequence ends with, and
head i guesses the i-th token after it. That state is the row of the sequence's accepted count
among the rows the runner computed logits for (row 0 for a step without drafts). No forward of
another model runs and no KV cache is kept; one gather, the heads and one read to the host per step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vibee.runtime.config import MEDUSA_HEADS_FILE as HEADS_FILE


def heads_path(spec, model_dir: Path | None) -> Path:
    """The spec's (or --medusa-heads') file, else the served model directory's medusa_heads.safetensors."""
    if spec.medusa_heads is not None:
        return Path(spec.medusa_heads)
    if model_dir is None:
        raise ValueError("speculative method medusa needs --medusa-heads FILE: a model of random weights has no heads")
    return model_dir / HEADS_FILE


class MedusaDrafter:
    def __init__(self, gen, target, path: Path, num_speculative_tokens: int, *, dtype: torch.dtype, device: str):
        from safetensors.torch import load_file

        if not path.is_file():
            raise ValueError(f"speculative method medusa: no heads file at {path} (train one with "
                             f"scripts/train_medusa_heads.py, or give --medusa-heads FILE)")
        self.heads = gen.speculative_decode.MedusaHeads.from_state_dict(
            load_file(str(path)), hidden_size=target.config.hidden_size, dtype=dtype, device=device).eval()
        if self.heads.num_heads < num_speculative_tokens:
            raise ValueError(f"{path} holds {self.heads.num_heads} medusa heads; num_speculative_tokens "
                             f"{num_speculative_tokens} needs as many heads")
        self.path = path
        self.target = target
        self.k = num_speculative_tokens
        self.device = device
        self.accepted: dict[int, int] = {}  # seq_id -> drafts accepted in the last step it verified

    def record(self, seq_id: int, num_accepted: int) -> None:
        self.accepted[seq_id] = num_accepted

    def forget(self, seq_id: int) -> None:
        self.accepted.pop(seq_id, None)

    def propose(self, runner, candidates: list[tuple[Any, int]]) -> list[list[int]]:
        """Drafts for each (sequence, room) candidate, [] for one the last step did not leave a
        hidden state for (it was not in that step, or has grown since)."""
        rows, drafting = [], []
        for j, (seq, _) in enumerate(candidates):
            where = runner.last_rows.get(seq.seq_id)
            if where is None:
                continue
            first, num_drafts, num_tokens = where
            accepted = self.accepted.get(seq.seq_id, 0) if num_drafts else 0
            if seq.num_tokens != num_tokens + accepted + 1:  # not the state after exactly that step
                continue
            rows.append(first + accepted)
            drafting.append(j)
        drafts: list[list[int]] = [[] for _ in candidates]
        if not rows:
            return drafts
        if runner.ranks is not None:  # the lm_head is vocab-parallel: the workers draft alongside (rank_worker.py)
            runner.ranks.send(("medusa", rows))
        with torch.inference_mode():
            hidden = runner.last_hidden[torch.tensor(rows, device=runner.last_hidden.device)]
            proposed = self.heads.propose(hidden, self.target.compute_logits, self.k).tolist()
        for j, tokens in zip(drafting, proposed):
            drafts[j] = tokens[: candidates[j][1]]
        return drafts

    def worst_case_step(self, rows: int) -> None:
        """The heads over as many rows as may draft at once (memory profiling)."""
        with torch.inference_mode():
            hidden = torch.zeros(rows, self.heads.hidden_size, dtype=self.heads.weight.dtype, device=self.device)
            self.heads.propose(hidden, self.target.compute_logits, self.k)
