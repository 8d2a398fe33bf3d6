"""A step the engine launched whose tokens the host has not read yet (see engine.py's step loop)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vibee.runtime.sampler import PendingSample, SampleResult

# An output token recorded before the host read it: a step is scheduled and launched while the
# previous one runs, so the previous step's tokens are known on the device (the next step reads
# them there) but not yet on the host. The engine puts the real token in its place a step later.
PLACEHOLDER = -1


@dataclass
class LaunchedStep:
    """A step on its way: what it runs, and what becomes of its sampled tokens once they are read."""

    sched: Any
    sampling: list[tuple]  # (sequence, first logits row, drafts, request, choice) of each sequence that samples
    before: list[int]  # each one's output length before the step (where its first new token goes)
    pending: PendingSample | None  # the plain rows' tokens on their way to the host
    results: dict[int, list[SampleResult]] | None  # seq_id -> emitted tokens' results, when read at launch
    # seq_id -> its row in the runner's `sampled`, for sequences holding a PLACEHOLDER for this step's token
    placeholders: dict[int, int]
    started: float  # perf_counter at launch
    new_prompt_tokens: int
    computed_prefill: int
    prefix_queries: int  # the block manager's counters before the step
    prefix_hits: int
    rounds: Any = None  # rounds on the device, until the engine reads them (multi_step.py, round_steps.py)
    # Speculative rounds whose tokens the scheduler has not recorded yet (0: none): how many a
    # sequence emits is known only once they are read (round_steps.read_speculative_rounds).
    unread_rounds: int = 0
    num_rounds: int = 1  # decode forwards of the step: its rounds on the device, else 1 (the speed gate counts them)
