"""Launching a step that runs in rounds on the device, with no host work between rounds:
speculative rounds (device_rounds.py through the speculator) and plain multi-steps
(multi_step.py). What the scheduler records for each, and the LaunchedStep the engine resolves."""

from __future__ import annotations

from typing import Any

from vibee.runtime.launched_step import PLACEHOLDER, LaunchedStep
from vibee.runtime.sampler import SampleResult


def _block_tables(runner: Any, sched: Any) -> tuple[list, Any]:
    """The scheduled sequences and their block-table rows; the runner's per-step rows are spent."""
    seqs = [item.seq for item in sched.scheduled]
    rows = runner.block_rows
    tables = rows.gather([rows.row(seq.seq_id) for seq in seqs])
    runner.last_rows, runner.last_hidden = {}, None
    return seqs, tables


def launch_speculative_rounds(sched: Any, rounds: int, runner: Any, speculator: Any, scheduler: Any,
                              by_seq: dict, counters: tuple[float, int, int]) -> LaunchedStep:
    """A step of speculative rounds: every sequence emits the tokens of all rounds, cut by the
    scheduler at a stop token or max_tokens like a verified draft's (its drafts become the emitted
    tokens, so the step reads as one verification of them). counters: (perf_counter at launch,
    prefix-cache queries and hits before it)."""
    seqs, tables = _block_tables(runner, sched)
    emitted = speculator.run_rounds(seqs, tables, rounds)
    sampling, results, sampled = [], {}, {}
    for item, tokens in zip(sched.scheduled, emitted):
        seq = item.seq
        room = len(item.draft_token_ids) + 1 - len(tokens)
        item.draft_token_ids = tuple(tokens[:-1]) + (tokens[-1],) * room  # the slots it held stay its lookahead
        sampling.append((seq, 0, item.draft_token_ids, *by_seq[seq.seq_id]))
        results[seq.seq_id] = [SampleResult(t, None, None) for t in tokens]
        sampled[seq.seq_id] = tokens
    before = [len(seq.output_token_ids) for seq in seqs]
    launched = LaunchedStep(sched, sampling, before, None, results, {}, counters[0], 0, 0, counters[1], counters[2])
    scheduler.update(sched, sampled)
    return launched


def launch_multi_step(sched: Any, rounds: int, runner: Any, multi_step: Any, scheduler: Any, by_seq: dict,
                      counters: tuple[float, int, int]) -> LaunchedStep:
    """Queue a step of plain rounds. The scheduler records each sequence's tokens as placeholders
    at once (without a stop, a sequence emits exactly the tokens its slots hold), so the next step
    is launched before this one's are read; resolving it puts them in (step_outputs.py), and a
    stop token among them ends the sequence there."""
    seqs, tables = _block_tables(runner, sched)
    started = multi_step.start(sched, tables, by_seq, rounds)
    sampled = {}
    for item in sched.scheduled:
        n = len(item.draft_token_ids) + 1
        item.draft_token_ids = (PLACEHOLDER,) * (n - 1)
        sampled[item.seq.seq_id] = [PLACEHOLDER] * n
    sampling = [(seq, 0, (), *by_seq[seq.seq_id]) for seq in seqs]
    # Sequence s's last token is in the runner's `sampled` row s after the last round: where a
    # plain step launched next takes it from.
    placeholders = {seq.seq_id: s for s, seq in enumerate(seqs)}
    launched = LaunchedStep(sched, sampling, [len(seq.output_token_ids) for seq in seqs], None, None,
                            placeholders, counters[0], 0, 0, counters[1], counters[2], rounds=started)
    scheduler.update(sched, sampled)
    return launched
