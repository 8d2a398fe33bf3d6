"""Speculative rounds on the device (vibee/runtime/device_rounds.py): n-gram drafts, verification
and acceptance queued round after round without the host. Greedy speculation never changes the
text, so every test compares with plain decoding; CUDA graphs are stood in for by eager replays
of the same buffers (tests/runtime/eager_graphs.py)."""

from __future__ import annotations


import pytest
import torch

from tests.runtime.eager_graphs import watch_round_starts
from tests.runtime.hf_models import make_model
from tests.runtime.test_engine import GREEDY, engine
from vibee.runtime.device_rounds import DeviceRounds
from vibee.runtime.offline import generate
from vibee.runtime.sampling_params import SamplingParams
from vibee.runtime.speed_gate import SpeedGate


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rounds-llama")
    make_model(directory, "llama", hidden=64, heads=4, kv_heads=2, layers=2)
    return directory


# Prompts that repeat themselves, so the n-gram drafter finds matches and drafts get accepted.
PROMPTS = [[7, 8, 9, 10, 11] * 4 + [7, 8], [20, 21, 22] * 5, [40 + i % 6 for i in range(23)], [5, 6] * 9]


@pytest.fixture
def rounds_seen(monkeypatch):
    """Eager graphs for every engine; returns the list of (batch, rounds) of each rounds step."""
    seen = []

    def record(rounds_object, seqs, rounds, chained, grammar_slots):
        if rounds_object.k:  # speculation's rounds, not plain multi-steps
            seen.append((len(seqs), rounds))
            CHAINED.append(chained)

    CHAINED.clear()
    watch_round_starts(monkeypatch, record)
    return seen


CHAINED: list[bool] = []  # whether each rounds step in rounds_seen queued behind unread rounds


def speculating(model_dir, **flags):
    eng = engine(model_dir, speculative=True, **flags)
    eng.speed_gate = SpeedGate.held()  # speculating throughout
    return eng


def outputs(eng, batch, params):
    return [[(c.token_ids, c.text, c.finish_reason) for c in out.outputs] for out in generate(eng, batch, params)]


@pytest.mark.parametrize("max_num_seqs", [1, 4])
def test_rounds_give_the_tokens_of_plain_decoding(model_dir, rounds_seen, max_num_seqs):
    params = SamplingParams(max_tokens=37, **GREEDY)  # not a multiple of k + 1
    plain = outputs(engine(model_dir, max_num_seqs=max_num_seqs), PROMPTS, params)
    eng = speculating(model_dir, max_num_seqs=max_num_seqs)
    assert outputs(eng, PROMPTS, params) == plain
    assert rounds_seen and max(rounds for _, rounds in rounds_seen) > 1
    assert max(batch for batch, _ in rounds_seen) == max_num_seqs
    assert True in CHAINED  # some steps queued behind rounds not read yet
    figures = eng.stats()["speculative_decoding"]
    assert figures["num_accepted_tokens"] > 0  # the device drafts were real, and some held
    assert figures["device_rounds"]["steps"] == len(rounds_seen)
    assert figures["device_rounds"]["rounds"] == sum(rounds for _, rounds in rounds_seen)
    assert eng.block_manager.num_free_blocks() == eng.num_blocks
    assert not eng.speculator.rounds._rows  # finished sequences gave their rows back


def test_a_sequence_near_its_max_tokens_ends_in_rounds(model_dir, rounds_seen):
    """max_tokens 7 at k = 4: after the prefill's token one step of rounds emits the other six
    (each round's drafts cut to what max_tokens leaves), where rounds needing k + 1 free slots
    each would have left them to steps of host drafts, a host sync each. The step after the
    prefill already runs rounds (a step that only prefilled proposed nothing: nothing rests).
    Rounds planned: what the tokens emitted per round so far say the six need, and one more."""
    import math

    params = SamplingParams(max_tokens=7, **GREEDY)
    first, second = PROMPTS[1], PROMPTS[3]  # prompts whose 7 tokens take drafts
    plain = outputs(engine(model_dir, max_num_seqs=1), [first, second], params)
    eng = speculating(model_dir, max_num_seqs=1)
    assert outputs(eng, [first], params) == plain[:1]
    assert rounds_seen == [(1, 7)]  # nothing measured yet: one token a round
    per_round = eng.speculator.rounds.emitted_per_round()
    assert per_round > 1  # drafts were accepted
    assert outputs(eng, [second], params) == plain[1:]
    assert rounds_seen[1] == (1, 1 + math.ceil(6 / per_round))
    assert eng.block_manager.num_free_blocks() == eng.num_blocks


def test_a_rounds_step_ends_a_streak_of_empty_host_proposals(model_dir, rounds_seen):
    """Rests after empty host proposals grow 1, 2, 4 ... while proposals stay empty; drafting on
    the device in between ends the streak, as host drafts do."""
    eng = speculating(model_dir)
    eng.speculator._empty_proposals = 3  # three empty host proposals in a row
    eng.add_request("r0", PROMPTS[0], SamplingParams(max_tokens=30, **GREEDY))
    while not rounds_seen:
        eng.step()
    assert eng.speculator._empty_proposals == 0


def test_a_stop_token_inside_a_round_ends_the_output_there(model_dir, rounds_seen):
    prompt = PROMPTS[:1]
    full = generate(engine(model_dir), prompt, SamplingParams(max_tokens=40, **GREEDY))[0].outputs[0].token_ids
    at = 13  # well inside the rounds (decoding starts with one plain step per prompt)
    stop_id = full[at]
    first = full.index(stop_id)
    params = SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=[stop_id])
    eng = speculating(model_dir)
    out = generate(eng, prompt, params)[0].outputs[0]
    assert out.token_ids == full[: first + 1] and out.finish_reason == "stop"
    assert rounds_seen and eng.block_manager.num_free_blocks() == eng.num_blocks
    assert CHAINED[-1]  # the stop was read a step late, behind rounds already queued


def test_a_stop_string_inside_a_round_cuts_the_text(model_dir, rounds_seen):
    prompt = PROMPTS[1:2]
    full = generate(engine(model_dir), prompt, SamplingParams(max_tokens=40, **GREEDY))[0].outputs[0]
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    params = SamplingParams(max_tokens=40, stop=[stop], **GREEDY)
    expected = generate(engine(model_dir), prompt, params)[0].outputs[0]
    got = generate(speculating(model_dir), prompt, params)[0].outputs[0]
    assert (got.text, got.token_ids, got.finish_reason) == (expected.text, expected.token_ids, "stop")
    assert rounds_seen and True in CHAINED


def test_preemption_during_rounds_loses_nothing(model_dir, rounds_seen, monkeypatch):
    """Too few KV blocks for every sequence's rounds: the scheduler preempts, the step's planned
    rounds become plain decodes of what was scheduled, and the text stays plain's."""
    unplanned = []
    real = DeviceRounds.unplan
    monkeypatch.setattr(DeviceRounds, "unplan", staticmethod(
        lambda sched: unplanned.append(sum(len(item.draft_token_ids) for item in sched.scheduled)) or real(sched)))
    params = SamplingParams(max_tokens=48, **GREEDY)
    plain = outputs(engine(model_dir, max_num_seqs=4), PROMPTS, params)
    eng = speculating(model_dir, max_num_seqs=4, num_kv_blocks=12)
    assert outputs(eng, PROMPTS, params) == plain
    assert eng.stats()["batching"]["preemptions"] > 0 and rounds_seen and any(unplanned)
    assert eng.block_manager.num_free_blocks() == eng.num_blocks


def test_a_step_behind_unread_rounds_that_does_not_get_its_slots_waits_for_them(model_dir, rounds_seen, monkeypatch):
    """A step queued behind unread rounds is planned to fit the free blocks; should the scheduler
    cut its slots anyway (forced here: the plan believes every slot free), nothing of it runs,
    the rounds in flight are read and the engine schedules afresh; the text stays plain's."""
    from vibee.runtime import engine as engine_module

    params = SamplingParams(max_tokens=80, **GREEDY)
    plain = outputs(engine(model_dir, max_num_seqs=2), PROMPTS, params)
    monkeypatch.setattr(DeviceRounds, "slots_fit", staticmethod(lambda space, running, planned: True))
    dropped = []
    real = engine_module.chain_speculative_rounds

    def chain(previous, scheduler, *args):
        before = scheduler.measured_stats()
        launched = real(previous, scheduler, *args)
        after = scheduler.measured_stats()
        dropped.append(launched is None and after["num_steps"] > before["num_steps"])
        assert after["num_preemptions"] == before["num_preemptions"]  # only lookahead is ever cut
        return launched

    monkeypatch.setattr(engine_module, "chain_speculative_rounds", chain)
    eng = speculating(model_dir, max_num_seqs=2, num_kv_blocks=8)
    assert outputs(eng, PROMPTS, params) == plain
    assert True in dropped and True in CHAINED
    assert eng.block_manager.num_free_blocks() == eng.num_blocks


def test_an_abort_while_rounds_are_unread_frees_everything(model_dir, rounds_seen):
    eng = speculating(model_dir, max_num_seqs=2)
    for i, prompt in enumerate(PROMPTS[:2]):
        eng.add_request(f"r{i}", prompt, SamplingParams(max_tokens=200, **GREEDY))
    while not CHAINED or not CHAINED[-1]:
        eng.step()
    assert eng._in_flight.unread_rounds
    final = eng.abort_request("r0")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    final = eng.abort_request("r1")  # the last one: the rounds in flight are read and dropped
    assert final.finished and eng._in_flight is None and not eng.has_unfinished()
    assert eng.block_manager.num_free_blocks() == eng.num_blocks and not eng.speculator.rounds._rows
    assert outputs(eng, PROMPTS[:1], SamplingParams(max_tokens=30, **GREEDY)) == \
        outputs(engine(model_dir), PROMPTS[:1], SamplingParams(max_tokens=30, **GREEDY))


def test_an_abort_between_rounds_steps_frees_everything(model_dir, rounds_seen):
    eng = speculating(model_dir, max_num_seqs=2)
    for i, prompt in enumerate(PROMPTS[:2]):
        eng.add_request(f"r{i}", prompt, SamplingParams(max_tokens=200, **GREEDY))
    while not rounds_seen:
        eng.step()
    final = eng.abort_request("r0")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    while eng.has_unfinished():
        eng.step()
    assert eng.block_manager.num_free_blocks() == eng.num_blocks and not eng.speculator.rounds._rows


def test_rounds_do_not_pause_sequences_but_honour_a_pause_from_the_host(model_dir, rounds_seen):
    """A round verifies k + 1 rows per sequence whatever it drafted, so the acceptance gate does
    not learn from rounds (a threshold of 0.99 drafts as much as 0); a sequence it paused still
    drafts nothing inside rounds until its pause ends."""
    params = SamplingParams(max_tokens=60, **GREEDY)
    plain = outputs(engine(model_dir, max_num_seqs=4), PROMPTS, params)
    figures = {}
    for threshold in (0.0, 0.99):
        rounds_seen.clear()
        eng = speculating(model_dir, max_num_seqs=4, speculative_acceptance_threshold=threshold)
        assert outputs(eng, PROMPTS, params) == plain
        figures[threshold] = eng.stats()["speculative_decoding"]
        assert rounds_seen
    assert figures[0.99]["gate"]["num_switched_off"] == 0
    assert figures[0.99]["num_draft_tokens"] == figures[0.0]["num_draft_tokens"] > 0
    eng = speculating(model_dir, max_num_seqs=4)
    eng.speculator.gate.allows = lambda seq_id: False  # every sequence paused: rounds decode plainly
    assert outputs(eng, PROMPTS, params) == plain
    assert eng.stats()["speculative_decoding"]["num_draft_tokens"] == 0


def test_while_the_gate_pauses_every_sequence_steps_decode_plainly_and_overlap(model_dir, rounds_seen):
    """A paused sequence in rounds would pay k + 1 verification rows a round for one token each:
    while every running sequence is paused, steps run no rounds and no host drafts, overlap like
    plain steps, and count towards the pause; rounds resume when it ends."""
    params = SamplingParams(max_tokens=120, **GREEDY)
    plain = outputs(engine(model_dir, max_num_seqs=1), PROMPTS[2:3], params)
    eng = speculating(model_dir, max_num_seqs=1)
    gate = eng.speculator.gate
    gate.pause_steps = 5
    eng.add_request("r", PROMPTS[2], params)
    tokens, paused_steps, rounds_after_pause = [], 0, 0
    while eng.has_unfinished():
        running = list(eng.scheduler.running)
        if len(tokens) >= 20 and not gate.figures()["num_switched_off"]:
            gate.record(running[0].seq_id, gate.window_tokens, 0)  # as a host-verified window that all missed
        paused = bool(running) and all(gate.paused(seq.seq_id) for seq in running)
        before = len(rounds_seen)
        for out in eng.step():
            tokens = out.outputs[0].token_ids
        if paused:
            paused_steps += 1
            assert len(rounds_seen) == before and not any(seq.draft_token_ids for seq in running)
            if running and all(gate.paused(seq.seq_id) for seq in running) and eng._in_flight is not None:
                assert eng._in_flight.placeholders  # the next step rests too: this one stays in flight
        elif gate.figures()["num_switched_on"]:
            rounds_after_pause += len(rounds_seen) - before
    assert tokens == plain[0][0][0]
    assert gate.figures()["num_switched_on"] == 1 and paused_steps == gate.pause_steps
    assert rounds_after_pause > 0


def test_sampled_requests_and_joining_ones_leave_drafting_to_the_host(model_dir, rounds_seen):
    """No rounds while a running request samples at a temperature (rounds verify greedily), nor
    while a waiting one could join the step (its prefill is the host's). A low temperature: the
    text repeats itself as the greedy text does, so the host finds n-gram drafts."""
    params = SamplingParams(max_tokens=12, temperature=0.05, seed=1)
    eng = speculating(model_dir, max_num_seqs=4)
    generate(eng, PROMPTS, params)
    assert not rounds_seen and eng.stats()["speculative_decoding"]["num_drafts"] > 0
    eng = speculating(model_dir, max_num_seqs=2)
    for i, prompt in enumerate(PROMPTS[:3]):
        eng.add_request(f"r{i}", prompt, SamplingParams(max_tokens=30, **GREEDY))
    while eng.has_unfinished():
        waiting, running = len(eng.scheduler.waiting), len(eng.scheduler.running)
        before = len(rounds_seen)
        eng.step()
        if len(rounds_seen) > before:
            assert not waiting or running == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rounds_on_the_gpu_keep_greedy_text_in_cuda_graphs():
    """The built-in model on stdlib text, real CUDA graphs: rounds run, drafts are accepted, and
    the tokens are plain decoding's (float32: a step of k + 1 rows per sequence could round a
    near tie differently from one row in bf16; the equality checked here is the bookkeeping's)."""
    from vibee.bench.report import stdlib_workload
    from vibee.runtime.config import EngineConfig
    from vibee.runtime.engine import LLMEngine

    def gpu_engine(**flags):
        return LLMEngine(EngineConfig(device="cuda", dtype="float32", **flags), progress=False)

    plain = gpu_engine(knobs={"continuous_batch": {"num_scheduler_steps": 1}})
    work = stdlib_workload(lambda t: plain.tokenizer.encode(t, add_special_tokens=False), 6, (64, 256), (96, 96), 0)
    params = SamplingParams(max_tokens=96, **GREEDY)
    expected = outputs(plain, work.prompts, params)
    del plain
    for max_num_seqs in (1, 6):
        eng = gpu_engine(speculative=True, knobs={"continuous_batch": {"max_num_seqs": max_num_seqs}})
        eng.speed_gate = SpeedGate.held()
        calls = []
        real = eng.speculator.rounds.start
        eng.speculator.rounds.start = lambda *a, **kw: calls.append(a[5]) or real(*a, **kw)
        assert outputs(eng, work.prompts, params) == expected
        assert calls and eng.stats()["speculative_decoding"]["acceptance_rate"] > 0.2
