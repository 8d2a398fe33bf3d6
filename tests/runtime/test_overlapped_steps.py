"""The overlapped step loop: a step is scheduled and launched before the previous step's tokens are
read back (they reach the next step on the device, through PLACEHOLDER output tokens). It must
give exactly what synchronous steps give: the same tokens, stops where they were, aborts that
free everything, and a prefix cache keyed by the real tokens."""

from __future__ import annotations

import pytest

from tests.runtime.hf_models import make_model
from tests.runtime.test_engine import GREEDY, engine, prompts
from vibee.runtime.engine import LLMEngine
from vibee.runtime.launched_step import PLACEHOLDER
from vibee.runtime.offline import generate
from vibee.runtime.sampling_params import SamplingParams
from vibee.runtime.speed_gate import SpeedGate


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("overlap-llama")
    make_model(directory, "llama", hidden=64, heads=4, kv_heads=2, layers=2)
    return directory


def synchronous(monkeypatch):
    """Every step reads its tokens before the next is scheduled (the loop before the overlap)."""
    monkeypatch.setattr(LLMEngine, "_can_overlap", lambda self: False)


def overlapped_steps(eng) -> list[bool]:
    """Run eng to completion; for each step, whether it left a step in flight."""
    seen = []
    while eng.has_unfinished():
        eng.step()
        seen.append(eng._in_flight is not None)
    return seen


def outputs(eng, batch, params):
    return [[(c.token_ids, c.text, c.finish_reason, [lp.logprob for lp in c.logprobs or []]) for c in out.outputs]
            for out in generate(eng, batch, params)]


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=20, **GREEDY),
    SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=3, n=2, ignore_eos=True, logprobs=2),
])
def test_overlapped_steps_give_what_synchronous_steps_give(model_dir, monkeypatch, params):
    batch = prompts([5, 23, 9, 40, 17], seed=2)
    eng = engine(model_dir, max_num_seqs=3)  # sequences wait and join mid-run
    for i, prompt in enumerate(batch):
        eng.add_request(f"r{i}", prompt, params)
    assert any(overlapped_steps(eng))  # the loop did overlap
    overlapped = outputs(engine(model_dir, max_num_seqs=3), batch, params)
    synchronous(monkeypatch)
    assert overlapped == outputs(engine(model_dir, max_num_seqs=3), batch, params)


def test_preemption_under_overlap_loses_nothing(model_dir, monkeypatch):
    batch = prompts([20, 33, 7, 26, 15, 40], seed=1)
    params = SamplingParams(max_tokens=24, **GREEDY)
    eng = engine(model_dir, num_kv_blocks=6)  # two sequences at most hold their whole KV at once
    got = outputs(eng, batch, params)
    assert eng.stats()["batching"]["preemptions"] > 0
    assert eng.block_manager.num_free_blocks() == eng.num_blocks
    synchronous(monkeypatch)
    assert got == outputs(engine(model_dir), batch, params)


@pytest.mark.parametrize("room", [8, 1])
def test_a_stop_token_read_a_step_late_ends_the_output_there(model_dir, room):
    """The step after the stop token is already running when the token is read: its token is
    dropped, the blocks are freed, and the finish reason is the stop, even when that next
    token would have reached max_tokens (room 1)."""
    prompt = prompts([12], seed=5)
    full = generate(engine(model_dir), prompt, SamplingParams(max_tokens=24, **GREEDY))[0].outputs[0]
    at = 6
    stop_id = full.token_ids[at]
    first = full.token_ids.index(stop_id)
    eng = engine(model_dir)
    params = SamplingParams(max_tokens=first + 1 + room, stop_token_ids=[stop_id], **GREEDY)
    cut = generate(eng, prompt, params)[0].outputs[0]
    assert cut.token_ids == full.token_ids[: first + 1]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop_id)
    assert eng.block_manager.num_free_blocks() == eng.num_blocks and not eng.scheduler.has_unfinished()


def test_a_stop_string_across_the_lag_cuts_the_text(model_dir):
    prompt = prompts([10], seed=6)
    full = generate(engine(model_dir), prompt, SamplingParams(max_tokens=24, **GREEDY))[0].outputs[0]
    stop = full.text[8:11]
    eng = engine(model_dir)
    eng.add_request("s", prompt[0], SamplingParams(max_tokens=24, stop=[stop], **GREEDY))
    final = None
    while eng.has_unfinished():
        for out in eng.step():
            final = out
    assert final.finished and final.outputs[0].text == full.text[: full.text.index(stop)]
    assert PLACEHOLDER not in final.outputs[0].token_ids
    assert eng.block_manager.num_free_blocks() == eng.num_blocks


def test_abort_while_a_step_is_in_flight(model_dir):
    batch = prompts([14, 30], seed=7)
    params = SamplingParams(max_tokens=16, **GREEDY)
    alone = generate(engine(model_dir), batch[1:], params)[0].outputs[0].token_ids
    eng = engine(model_dir)
    eng.add_request("gone", batch[0], params)
    eng.add_request("kept", batch[1], params)
    reported = []
    while eng._in_flight is None or len(reported) < 3:
        reported += [c.delta_token_ids for out in eng.step() if out.request_id == "gone" for c in out.outputs]
    final = eng.abort_request("gone")  # its token of the step in flight is dropped
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert final.outputs[0].token_ids == [t for delta in reported for t in delta] + final.outputs[0].delta_token_ids
    assert PLACEHOLDER not in final.outputs[0].token_ids
    kept = []
    while eng.has_unfinished():
        for out in eng.step():
            assert out.request_id == "kept"
            kept = out.outputs[0].token_ids
    assert kept == alone
    assert eng.block_manager.num_free_blocks() == eng.num_blocks and eng._in_flight is None


def test_aborting_the_last_request_reads_the_step_in_flight(model_dir):
    eng = engine(model_dir)
    eng.add_request("only", prompts([9])[0], SamplingParams(max_tokens=30, **GREEDY))
    while eng._in_flight is None:
        eng.step()
    eng.abort_request("only")
    assert eng._in_flight is None and not eng.has_unfinished()
    assert eng.block_manager.num_free_blocks() == eng.num_blocks


def test_generated_blocks_are_cached_under_their_real_tokens(model_dir):
    """A follow-up turn whose prompt holds the first turn's output finds those blocks in the prefix
    cache: the blocks filled while their last token was a placeholder were re-keyed."""
    eng = engine(model_dir)
    prompt = prompts([16], seed=9)[0]
    first = generate(eng, [prompt], SamplingParams(max_tokens=40, **GREEDY))[0].outputs[0].token_ids
    follow = prompt + first + [5, 6, 7]
    eng.add_request("turn2", follow, SamplingParams(max_tokens=2, **GREEDY))
    cached = None
    while eng.has_unfinished():
        for out in eng.step():
            cached = out.num_cached_tokens
    block = eng.block_size
    assert cached == (len(prompt) + len(first) - 1) // block * block  # every full block before the last token


def test_speculation_pauses_for_sequences_whose_drafts_miss(model_dir):
    """The engine asks the spec's gate before drafting for a sequence and tells it what was
    accepted: above the acceptance its drafts reach, sequences stop drafting for a while (and
    still give plain decoding's tokens); at 0 they never do."""
    batch = prompts([6, 19, 11], seed=3)
    params = SamplingParams(max_tokens=60, **GREEDY)
    plain = outputs(engine(model_dir), batch, params)
    figures = {}
    for threshold in (0.0, 0.95):
        eng = engine(model_dir, speculative=True, speculative_acceptance_threshold=threshold)
        eng.speed_gate = SpeedGate.held()  # speculating throughout: only the acceptance gate decides
        assert outputs(eng, batch, params) == plain
        figures[threshold] = eng.stats()["speculative_decoding"]
        assert figures[threshold]["gate"]["num_sequences"] == 0  # finished sequences are forgotten
    assert figures[0.0]["gate"]["num_switched_off"] == 0
    assert figures[0.95]["gate"]["num_switched_off"] > 0
    assert 0 < figures[0.95]["num_draft_tokens"] < figures[0.0]["num_draft_tokens"]  # paused ones did not draft


def switched(gate: SpeedGate) -> None:
    """The step after a switch of modes: it reports the tokens of the step before it, launched in
    the other mode (steps overlap), so the gate counts nothing of it."""
    before = (gate.phase, gate.speculating, dict(gate.rates), gate.figures())
    gate.record(tokens=10**6, seconds=1e-6, forwards=10**6)
    assert (gate.phase, gate.speculating, dict(gate.rates), gate.figures()) == before


def test_speed_gate_keeps_the_faster_mode_and_measures_again():
    gate = SpeedGate(probe_steps=2, hold_steps=3)
    assert not gate.speculating and gate.phase == "probe_off"  # plain first: its time bounds the other probe
    for _ in range(2):
        gate.record(tokens=6, seconds=1.0)  # plain: 6 tok/s
    assert gate.speculating and gate.phase == "probe_on"
    switched(gate)
    for _ in range(2):
        gate.record(tokens=4, seconds=1.0)  # speculating: 4 tok/s, slower
    assert (gate.phase, gate.speculating) == ("hold", False) and gate.rates == {True: 4.0, False: 6.0}
    switched(gate)
    for _ in range(3):
        gate.record(tokens=6, seconds=1.0)
    assert (gate.phase, gate.speculating) == ("probe_off", False)  # measured again
    for tokens in (6, 6):
        gate.record(tokens=tokens, seconds=1.0)
    switched(gate)
    for tokens in (9, 9):
        gate.record(tokens=tokens, seconds=1.0)
    assert (gate.phase, gate.speculating) == ("hold", True)  # now speculation is faster
    assert gate.figures()["holds_speculating"] == 1 and gate.figures()["holds_plain"] == 1
    with pytest.raises(ValueError):
        SpeedGate(probe_steps=0)


def test_the_speed_gate_counts_decode_forwards_not_engine_steps():
    """A step of r rounds on the device counts r: the probes cost the same decode forwards
    whether steps run in rounds or one forward each."""
    gate = SpeedGate(probe_steps=16, hold_steps=64)
    gate.record(tokens=8, seconds=1.0, forwards=8)  # a multi-step of 8 rounds
    assert gate.phase == "probe_off"
    gate.record(tokens=8, seconds=1.0, forwards=8)
    assert (gate.phase, gate.rates[False]) == ("probe_on", 8.0)
    switched(gate)
    for _ in range(16):
        gate.record(tokens=2, seconds=0.1)  # host steps, one forward each: 20 tok/s
    assert (gate.phase, gate.speculating) == ("hold", True)
    gate.record(tokens=30, seconds=1.0, forwards=60)
    assert gate.phase == "hold"
    gate.record(tokens=3, seconds=0.1, forwards=4)  # 64 forwards: the hold is over
    assert gate.phase == "probe_off"


@pytest.mark.parametrize("speculating", [False, True])
def test_the_speed_gate_times_neither_a_prefill_step_nor_the_step_that_waits_for_it(model_dir, speculating):
    """A prefill step is left in flight and the next step waits for it (a new request at batch 1
    costs several decode steps): both are reported to the gate as prefill, in either mode."""
    eng = engine(model_dir, speculative=True, max_num_seqs=1)
    eng.speed_gate = SpeedGate.held()
    eng.speed_gate.speculating = speculating
    recorded = []
    real = eng.speed_gate.record
    eng.speed_gate.record = lambda tokens, seconds, prefill=False, forwards=1: recorded.append(prefill) or real(
        tokens, seconds, prefill=prefill, forwards=forwards)
    for i, prompt in enumerate(prompts([9, 14], seed=4)):
        eng.add_request(f"r{i}", prompt, SamplingParams(max_tokens=6, **GREEDY))
    while eng.has_unfinished():
        eng.step()
    assert recorded[:3] == [True, True, False]


def test_speed_gate_waits_longer_each_time_plain_wins_again_and_skips_prefill_in_probes():
    gate = SpeedGate(probe_steps=2, hold_steps=3)

    def cycle(spec_rate: int, plain_rate: int) -> int:
        """One probe of each mode; returns how many steps the hold that follows lasts."""
        assert gate.phase == "probe_off"
        gate.record(tokens=100, seconds=1.0, prefill=True)  # not timed: a prefill would decide the probe
        for _ in range(2):
            gate.record(tokens=plain_rate, seconds=1.0)
        switched(gate)
        gate.record(tokens=100, seconds=1.0, prefill=True)
        for _ in range(2):
            gate.record(tokens=spec_rate, seconds=1.0)
        assert gate.phase == "hold"
        if not gate.speculating:
            switched(gate)
        held = 0
        while gate.phase == "hold":
            gate.record(tokens=1, seconds=1.0, prefill=held % 2 == 0)  # every step counts in a hold
            held += 1
        return held

    assert [cycle(1, 5) for _ in range(7)] == [3, 6, 12, 24, 48, 48, 48]  # doubling, up to MAX_BACKOFF (16)
    assert gate.rates == {True: 1.0, False: 5.0}
    assert cycle(9, 5) == 3  # speculation won: back to hold_steps
    assert cycle(1, 5) == 3  # and plain's first win again holds hold_steps


def test_a_speculating_probe_ends_once_it_took_as_long_as_the_plain_one():
    gate = SpeedGate(probe_steps=4, hold_steps=2)
    for _ in range(4):
        gate.record(tokens=1, seconds=0.5)  # plain: 4 steps in 2 s, 2 tok/s
    assert gate.phase == "probe_on"
    switched(gate)
    gate.record(tokens=2, seconds=1.5)  # a slow speculating step: 1.5 s of the 2 s
    assert gate.phase == "probe_on"
    gate.record(tokens=2, seconds=1.5)  # 3 s >= 2 s: the probe is over after 2 of its 4 steps
    assert (gate.phase, gate.speculating) == ("hold", False) and gate.rates[True] == pytest.approx(4 / 3)


def test_a_speculating_probe_clearly_losing_ends_after_an_eighth_of_its_steps():
    from vibee.runtime.speed_gate import LOSING

    def probe(spec_rate: float) -> int:
        """Speculating steps the probe takes after 16 plain ones at 10 tok/s."""
        gate = SpeedGate(probe_steps=16, hold_steps=100)
        for _ in range(16):
            gate.record(tokens=10, seconds=1.0)
        switched(gate)
        steps = 0
        while gate.phase == "probe_on":
            gate.record(tokens=spec_rate, seconds=1.0)
            steps += 1
        assert not gate.speculating and gate.rates[True] == spec_rate
        return steps

    assert probe(10 * LOSING - 1) == 2  # clearly slower: out after 16 / 8 steps
    assert probe(10 * LOSING + 1) == 16  # close: the whole probe decides


def test_with_speculation_measured_slower_steps_overlap_and_tokens_stay(model_dir, monkeypatch):
    """--speculative while the speed gate holds plain decoding: steps overlap like plain ones and
    give the same tokens; while it speculates, a step that verifies drafts never leaves its tokens
    unread (the next proposal needs them; its outputs are still made during the next step), and
    after a proposal that found nothing the resting steps overlap."""
    batch = prompts([6, 19], seed=3)
    params = SamplingParams(max_tokens=30, **GREEDY)
    plain = outputs(engine(model_dir), batch, params)
    for speculating in (False, True):
        eng = engine(model_dir, speculative=True)
        eng.speed_gate = SpeedGate.held()
        eng.speed_gate.speculating = speculating
        for i, prompt in enumerate(batch):
            eng.add_request(f"r{i}", prompt, params)
        left_in_flight = []
        while eng.has_unfinished():
            eng.step()
            left_in_flight.append(eng._in_flight is not None and bool(eng._in_flight.placeholders))
            if speculating and left_in_flight[-1]:  # a step left with tokens unread drafted nothing, and drafting rests
                assert not any(s.draft_token_ids for s in eng.scheduler.running) and eng.speculator.resting()
            if eng._in_flight is not None and not eng._in_flight.placeholders:  # read at launch: resolved next step
                assert eng._in_flight.results is not None
        assert any(left_in_flight)  # plain steps overlap, and so do resting ones
        assert (eng.stats()["speculative_decoding"]["num_drafts"] > 0) == speculating
        eng = engine(model_dir, speculative=True)
        eng.speed_gate = SpeedGate.held()
        eng.speed_gate.speculating = speculating
        assert outputs(eng, batch, params) == plain


def test_empty_proposals_rest_drafting_longer_each_time_and_drafts_end_it(model_dir):
    """A proposal that gives no sequence drafts rests 1, 2, 4 ... MAX_REST_STEPS steps; one
    that gives drafts ends the streak."""
    from vibee.runtime.speculation import MAX_REST_STEPS

    eng = engine(model_dir, speculative=True)
    spec = eng.speculator
    rests = []
    for _ in range(6):
        spec._draft = lambda running, by_seq, runner: True  # a proposal, with no drafts
        spec.propose([], {}, None)
        rests.append(spec.rest_steps)
        while spec.resting():
            spec.rest([])
    assert rests == [min(2 ** i, MAX_REST_STEPS) for i in range(6)]

    class Seq:
        draft_token_ids = [1]

    spec._draft = lambda running, by_seq, runner: True
    spec.propose([Seq()], {}, None)  # drafts: no rest, and the streak starts again
    assert not spec.resting()
    spec.propose([], {}, None)
    assert spec.rest_steps == 1
    del spec._draft  # the real one: a step with no sequence decoding (a prefill) is no proposal
    spec.rest_steps = 0
    spec.propose([], {}, None)
    assert spec.rest_steps == 0 and spec._empty_proposals == 1


def test_a_speculating_hold_slower_than_plain_turns_into_a_plain_hold():
    gate = SpeedGate(probe_steps=2, hold_steps=10)
    for tokens in (5, 5, None, 9, 9):  # probes: speculation 9 tok/s beats plain 5
        switched(gate) if tokens is None else gate.record(tokens=tokens, seconds=1.0)
    assert (gate.phase, gate.speculating) == ("hold", True)
    gate.record(tokens=50, seconds=1.0, prefill=True)  # counts toward the hold, not its rate
    gate.record(tokens=4, seconds=1.0)
    assert gate.speculating  # one decode step is not yet a measurement
    gate.record(tokens=4, seconds=1.0)  # 4 tok/s over probe_steps decode steps: below plain's 5
    assert (gate.phase, gate.speculating) == ("hold", False) and gate.rates[True] == 4.0
    assert gate.figures()["holds_plain"] == 1
    switched(gate)
    steps = 0
    while gate.phase == "hold":
        gate.record(tokens=5, seconds=1.0)
        steps += 1
    assert steps == 10 and gate.phase == "probe_off"  # a whole plain hold, then measured again


def test_a_speculating_hold_that_keeps_up_runs_to_its_end():
    gate = SpeedGate(probe_steps=2, hold_steps=6)
    for tokens in (5, 5, None, 9, 9):
        switched(gate) if tokens is None else gate.record(tokens=tokens, seconds=1.0)
    for _ in range(6):
        assert (gate.phase, gate.speculating) == ("hold", True)
        gate.record(tokens=6, seconds=1.0)
    assert gate.phase == "probe_off"
