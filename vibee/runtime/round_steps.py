"""Launching a step that runs in rounds on the device, with no host work between rounds:
speculative rounds (device_rounds.py through the speculator) and plain multi-steps
(multi_step.py). What the scheduler records for each, and the LaunchedStep the engine resolves."""

from __future__ import annotations

import time
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


def launch_speculative_rounds(sched: Any, rounds: int, runner: Any, speculator: Any, by_seq: dict,
                              counters: tuple[float, int, int], *, chained: bool) -> LaunchedStep:
    """Queue a step of speculative rounds. How many tokens each sequence emits is known only
    once they are read, so the scheduler records nothing yet: the engine queues the next step's
    rounds behind these (chained: each sequence holds slots for both) and then reads these
    (read_speculative_rounds), so the GPU runs rounds while the host reads, schedules and makes
    text. counters: (perf_counter at launch, prefix-cache queries and hits before it)."""
    seqs, tables = _block_tables(runner, sched)
    started = speculator.queue_rounds(seqs, tables, rounds, chained)
    return LaunchedStep(sched, [], [], None, None, {}, counters[0], 0, 0, counters[1], counters[2], rounds=started,
                        unread_rounds=rounds, num_rounds=rounds)


def chain_speculative_rounds(previous: LaunchedStep, scheduler: Any, space: Any, runner: Any, speculator: Any,
                             by_seq: dict, max_num_batched_tokens: int) -> LaunchedStep | None:
    """Schedule and queue speculative rounds behind `previous`'s unread ones, when every running
    sequence can run them (DeviceRounds.plan with in_flight); else None, and the engine reads the
    rounds in flight and schedules afresh. space: the block manager (prefix-cache counters)."""
    t0 = time.perf_counter()
    queries0, hits0 = space.prefix_cache_queries, space.prefix_cache_hits
    rounds = speculator.plan_rounds(scheduler, by_seq, max_num_batched_tokens, in_flight=previous.unread_rounds)
    if not rounds:
        return None
    num_running = len(scheduler.running)
    sched = scheduler.schedule()
    if speculator.rounds.fits(sched, num_running):
        return launch_speculative_rounds(sched, rounds, runner, speculator, by_seq, (t0, queries0, hits0),
                                         chained=True)
    # The scheduler cut some sequence's slots (the plan found them free: it should not). Nothing
    # of this step runs. It cannot have preempted anyone: every sequence's blocks already cover
    # the tokens the host knows (their slots were held for the rounds in flight), so only
    # lookahead is cut.
    for item in sched.scheduled:
        item.seq.draft_token_ids = []
    return None


def read_speculative_rounds(launched: LaunchedStep, speculator: Any, scheduler: Any, by_seq: dict) -> None:
    """Read a speculative step's tokens (waits for its rounds) and record them in the scheduler,
    cut at a stop token or max_tokens like a verified draft's: its placeholder drafts become the
    emitted tokens, so the step reads as one verification of them. A sequence that ended or was
    preempted since it was launched records nothing; it emitted nothing the host keeps."""
    emitted = speculator.read_rounds(launched.rounds)
    sampling, before, results, sampled = [], [], {}, {}
    for item, tokens in zip(launched.sched.scheduled, emitted):
        seq = item.seq
        if not tokens or seq.status is not type(seq.status).RUNNING or seq.seq_id not in by_seq:
            continue
        room = len(item.draft_token_ids) + 1 - len(tokens)
        item.draft_token_ids = tuple(tokens[:-1]) + (tokens[-1],) * room  # the slots it held stay its lookahead
        sampling.append((seq, 0, item.draft_token_ids, *by_seq[seq.seq_id]))
        before.append(len(seq.output_token_ids))
        results[seq.seq_id] = [SampleResult(t, None, None) for t in tokens]
        sampled[seq.seq_id] = tokens
    launched.sampling, launched.before, launched.results = sampling, before, results
    launched.rounds, launched.unread_rounds = None, 0
    scheduler.update(launched.sched, sampled)


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
                            placeholders, counters[0], 0, 0, counters[1], counters[2], rounds=started,
                            num_rounds=rounds)
    scheduler.update(sched, sampled)
    return launched
