"""Plain decoding in rounds on the device: several decode steps of the whole batch per engine step,
each token sampled on the device, with one host sync after the last.

At large batches the engine's host work per step (scheduling, input packing, sampling setup,
reading tokens back) grows with the batch and passes the GPU's: on the H200 the Llama-3.2-1B
shape at batch 256 took ~4.7 ms a step against 3.9 ms of GPU work. A round is a CUDA graph of
one decode step (vibee/runtime/device_rounds.py with no drafts: each row's input is its
sequence's last token on the device, its token is drawn at its temperature in the graph), so
a step of r rounds is scheduled, packed and read once; the text, stops and outputs of a step's
r tokens per sequence are made while the next step's rounds run.

Rounds run only when every running sequence decodes a plain row (temperature only: no
penalties, logprobs, top-k/top-p/min-p or seeded generator; a grammar only as a token DFA, whose
states the rounds mask and advance on the device), and no waiting request could join
(admitting one is a prefill, the host's to run). Each sequence holds KV slots for its rounds
(placeholder drafts the scheduler allocates as lookahead) and stops at its max_tokens on the
device; what it computes past a stop token or string is dropped, as after a verified draft.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vibee.runtime.device_rounds import DeviceRounds
from vibee.runtime.grammar_table import DFAConstraint
from vibee.runtime.round_proposers import PlainProposer


def plain_row(params: Any, generator: Any, constraint: Any = None) -> bool:
    """Whether a request's rows can be sampled in rounds: temperature (or greedy) alone, and a
    grammar only as a token DFA (constraint: a choice's; the rounds mask and advance it)."""
    on_device = isinstance(constraint, DFAConstraint)
    return (generator is None and not (params.has_logit_rules if on_device else params.has_penalties)
            and params.logprobs is None and params.top_p >= 1.0 and params.top_k < 1 and params.min_p <= 0.0)


class MultiStep:
    def __init__(self, graphs: Any, sampler: Any, *, max_rounds: int, max_num_seqs: int, max_model_len: int,
                 block_size: int, padding_slot: int, device: str, grammar: Any = None):
        """max_rounds: the continuous_batch spec's num_scheduler_steps (rounds per engine step);
        grammar: the token-DFA table (grammar_table.GrammarTable) whose constrained rows the rounds mask."""
        self.sampler, self.device, self.max_rounds = sampler, device, max_rounds
        self.seed = torch.zeros(1, dtype=torch.long, device=device)
        self.rounds = DeviceRounds(PlainProposer(max_num_seqs, device), graphs, k=0, max_rows=max_num_seqs,
                                   max_model_len=max_model_len, block_size=block_size, padding_slot=padding_slot,
                                   device=device, sample=True, seed=self.seed, grammar=grammar)
        self._planned: dict[int, int] = {}  # seq_id -> tokens the planned step may emit

    def ready(self, scheduler: Any, max_num_batched_tokens: int) -> int:
        """Rounds the next step could run (0: none): every running sequence decoding, no waiting
        one that could be admitted, at least two rounds in the token budget. The caller checked
        that every request's rows are plain (plain_row)."""
        running = scheduler.running
        if not running or (scheduler.waiting and len(running) < scheduler.max_num_seqs):
            return 0
        rounds = min(self.max_rounds, max_num_batched_tokens // len(running))
        if rounds < 2 or len(running) > self.rounds.max_rows:
            return 0
        for seq in running:
            if not seq.output_token_ids or seq.num_tokens - seq.num_computed_tokens != 1:
                return 0
        return rounds

    def plan(self, scheduler: Any, max_num_batched_tokens: int) -> int:
        """ready(), and when > 0 give each running sequence the placeholder drafts that hold its
        rounds' KV slots (fewer near its max_tokens)."""
        rounds = self.ready(scheduler, max_num_batched_tokens)
        self._planned = {}
        for seq in scheduler.running if rounds else ():
            n = min(rounds, seq.max_tokens - len(seq.output_token_ids))
            self._planned[seq.seq_id] = n
            seq.draft_token_ids = [seq.output_token_ids[-1]] * (n - 1)
        return rounds

    def fits(self, sched: Any, num_running: int) -> bool:
        """Whether the scheduler gave the step what plan() asked for: every running sequence with
        all its slots, nothing else (no preemption, no swap)."""
        planned = self._planned
        return (len(sched.scheduled) == num_running and not sched.preempted and not sched.swap_out
                and not sched.swap_in and all(not item.is_prefill and len(item.draft_token_ids) + 1 == planned.get(
                    item.seq.seq_id) for item in sched.scheduled))

    def start(self, sched: Any, tables: np.ndarray, by_seq: dict[int, tuple[Any, Any]], rounds: int) -> tuple:
        """Queue the step's rounds (see DeviceRounds.start); finish() reads them."""
        seqs = [item.seq for item in sched.scheduled]
        rooms = [self._planned[seq.seq_id] for seq in seqs]
        caps = [seq.num_tokens + room for seq, room in zip(seqs, rooms)]
        temperatures = [0.0 if p.is_greedy else p.temperature for p in (by_seq[seq.seq_id][0].params for seq in seqs)]
        grammar_slots = [_grammar_slot(by_seq[seq.seq_id][1].constraint) for seq in seqs]
        # Fresh noise for every step, from the sampler's generator (seeded engines repeat).
        self.seed.copy_(torch.randint(2**62, (1,), device=self.device,
                                      generator=self.sampler.shared_generator(self.device)))
        return self.rounds.start(seqs, tables, [True] * len(seqs), rooms, caps, rounds, temperatures,
                                 grammar_slots=grammar_slots)

    def finish(self, started: tuple) -> list[list[int]]:
        """Each sequence's tokens from the step's rounds (waits for them)."""
        return self.rounds.finish(started)[0]

    def forget(self, seq_id: int) -> None:
        self.rounds.forget(seq_id)

    def figures(self) -> dict[str, Any]:
        return {"steps": self.rounds.num_steps, "rounds": self.rounds.num_rounds, "max_rounds": self.max_rounds,
                "captured": sorted(self.rounds.round_graphs)}


def _grammar_slot(constraint: Any) -> int:
    """A sequence's slot of the token-DFA table (0: unconstrained; a plain row's grammar, if
    any, is a token DFA)."""
    return constraint.slot if isinstance(constraint, DFAConstraint) else 0
