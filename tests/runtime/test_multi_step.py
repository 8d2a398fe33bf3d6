"""Plain decoding in rounds on the device (vibee/runtime/multi_step.py): several decode steps per
host round trip. Greedy rounds give plain decoding's tokens, so most tests compare with an engine
at num_scheduler_steps 1; CUDA graphs are stood in for by eager replays of the same buffers
(tests/runtime/eager_graphs.py), and the sampling kernel runs in Triton's interpreter."""

from __future__ import annotations


import pytest
import torch

from tests.runtime.eager_graphs import watch_round_starts
from tests.runtime.hf_models import make_model
from tests.runtime.test_engine import GREEDY, engine
from vibee.runtime.device_rounds import DeviceRounds
from vibee.runtime.offline import generate
from vibee.runtime.sampling_params import SamplingParams


PROMPTS = [[7, 8, 9, 10, 11] * 4, [20, 21, 22] * 5, [40 + i % 6 for i in range(23)], [5, 6] * 9]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("multi-step-llama")
    make_model(directory, "llama", hidden=64, heads=4, kv_heads=2, layers=2)
    return directory


@pytest.fixture
def rounds_seen(monkeypatch):
    """Eager graphs for every engine; returns (sequences, rounds) of each multi-step."""
    seen = []

    def record(rounds_object, seqs, rounds, chained, grammar_slots):
        if not rounds_object.k:  # plain rounds, not speculation's
            seen.append((len(seqs), rounds))
            EVENTS.append("start")

    watch_round_starts(monkeypatch, record)
    real_finish = DeviceRounds.finish

    def finish(self, started):
        if not self.k:
            EVENTS.append("finish")
        return real_finish(self, started)

    EVENTS.clear()
    monkeypatch.setattr(DeviceRounds, "finish", finish)
    return seen


EVENTS: list[str] = []  # "start" and "finish" of multi-steps, in order


def outputs(eng, batch, params):
    return [[(c.token_ids, c.text, c.finish_reason) for c in out.outputs] for out in generate(eng, batch, params)]


def plain(model_dir, batch, params, **flags):
    eng = engine(model_dir, num_scheduler_steps=1, **flags)
    assert eng.multi_step is None
    return outputs(eng, batch, params)


@pytest.mark.parametrize("steps, max_num_seqs", [(4, 4), (8, 2)])
def test_rounds_give_the_tokens_of_plain_decoding(model_dir, rounds_seen, steps, max_num_seqs):
    """max_tokens that are no multiple of the rounds, and differ: sequences stop at their own
    limits on the device, mid-step, while the others go on."""
    batch = PROMPTS[:max_num_seqs]
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in (23, 30, 17, 9)[:max_num_seqs]]
    expected = plain(model_dir, batch, params, max_num_seqs=max_num_seqs)
    eng = engine(model_dir, num_scheduler_steps=steps, max_num_seqs=max_num_seqs)
    assert outputs(eng, batch, params) == expected
    assert rounds_seen and max(r for _, r in rounds_seen) == steps and max(b for b, _ in rounds_seen) == max_num_seqs
    # Each multi-step is read while the next one runs: two starts before the first one's finish.
    assert EVENTS[:3] == ["start", "start", "finish"] and EVENTS.count("start") == EVENTS.count("finish")
    figures = eng.stats()["batching"]["multi_step"]
    assert figures["steps"] == len(rounds_seen) and figures["rounds"] == sum(r for _, r in rounds_seen)
    assert eng.block_manager.num_free_blocks() == eng.num_blocks
    assert not eng.multi_step.rounds._rows  # finished sequences gave their rows back


def test_a_multi_step_is_one_inter_token_gap(model_dir, rounds_seen):
    """Latency figures count a step's tokens as one arrival (as vLLM v1 counts ITL), not as one
    gap and then zeros."""
    finished = []

    class Observer:
        def on_step(self, stats):
            pass

        def on_request_finished(self, stats):
            finished.append(stats)

    eng = engine(model_dir, num_scheduler_steps=4)
    eng.add_observer(Observer())
    generate(eng, PROMPTS[:1], SamplingParams(max_tokens=25, **GREEDY))
    gaps = finished[0].inter_token_latencies
    # The first token comes from the prefill, the other 24 from six multi-steps of 4: six gaps.
    assert rounds_seen == [(1, 4)] * 6
    assert len(gaps) == 6 and all(g > 0 for g in gaps)


def test_sampled_rounds_repeat_with_the_engine_seed(model_dir, rounds_seen):
    params = SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True)
    first = outputs(engine(model_dir, seed=5, max_num_seqs=2), PROMPTS[:2], params)
    assert rounds_seen
    assert outputs(engine(model_dir, seed=5, max_num_seqs=2), PROMPTS[:2], params) == first
    assert outputs(engine(model_dir, seed=6, max_num_seqs=2), PROMPTS[:2], params) != first
    greedy = plain(model_dir, PROMPTS[:2], SamplingParams(max_tokens=24, **GREEDY), max_num_seqs=2)
    assert [o[0][0] for o in first] != [o[0][0] for o in greedy]


def test_a_stop_token_inside_the_rounds_ends_the_output_there(model_dir, rounds_seen):
    full = plain(model_dir, PROMPTS[:1], SamplingParams(max_tokens=40, **GREEDY))[0][0][0]
    stop_id = full[13]
    first = full.index(stop_id)
    params = SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=[stop_id])
    eng = engine(model_dir)
    out = generate(eng, PROMPTS[:1], params)[0].outputs[0]
    assert out.token_ids == full[: first + 1] and out.finish_reason == "stop"
    assert rounds_seen and eng.block_manager.num_free_blocks() == eng.num_blocks


def test_a_stop_string_inside_the_rounds_cuts_the_text(model_dir, rounds_seen):
    full = plain(model_dir, PROMPTS[1:2], SamplingParams(max_tokens=40, **GREEDY))[0][0]
    stop = full[1][len(full[1]) // 2: len(full[1]) // 2 + 3]
    params = SamplingParams(max_tokens=40, stop=[stop], **GREEDY)
    expected = plain(model_dir, PROMPTS[1:2], params)
    assert outputs(engine(model_dir), PROMPTS[1:2], params) == expected and expected[0][0][2] == "stop"
    assert rounds_seen


def test_an_abort_between_multi_steps_frees_everything(model_dir, rounds_seen):
    eng = engine(model_dir, max_num_seqs=2)
    for i, prompt in enumerate(PROMPTS[:2]):
        eng.add_request(f"r{i}", prompt, SamplingParams(max_tokens=200, **GREEDY))
    while not rounds_seen:
        eng.step()
    final = eng.abort_request("r0")  # its rounds are still to be read
    assert final.finished and final.outputs[0].finish_reason == "abort"
    while eng.has_unfinished():
        eng.step()
    assert eng.block_manager.num_free_blocks() == eng.num_blocks and not eng.multi_step.rounds._rows


def test_requests_that_are_not_plain_keep_every_step_on_the_host(model_dir, rounds_seen):
    """Logprobs, top-k, penalties or a seed: none of the batch runs in rounds while one is there."""
    for other in (dict(logprobs=2), dict(top_k=5), dict(repetition_penalty=1.2), dict(seed=3)):
        params = [SamplingParams(max_tokens=12, **GREEDY), SamplingParams(max_tokens=12, temperature=0.8, **other)]
        generate(engine(model_dir, max_num_seqs=2), PROMPTS[:2], params)
        assert not rounds_seen, other
    generate(engine(model_dir, max_num_seqs=2), PROMPTS[:2], SamplingParams(max_tokens=12, temperature=0.8))
    assert rounds_seen


def test_waiting_requests_join_before_rounds_resume(model_dir, rounds_seen):
    """Six prompts, four at a time: rounds run only while nothing could be admitted, and the
    text is plain decoding's."""
    batch = PROMPTS + PROMPTS[:2]
    params = SamplingParams(max_tokens=20, **GREEDY)
    expected = plain(model_dir, batch, params, max_num_seqs=4)
    eng = engine(model_dir, max_num_seqs=4)
    assert outputs(eng, batch, params) == expected
    assert rounds_seen and eng.stats()["requests"]["finished"] == 6


def test_preemption_with_few_blocks_loses_nothing(model_dir, rounds_seen):
    params = SamplingParams(max_tokens=48, **GREEDY)
    expected = plain(model_dir, PROMPTS, params, max_num_seqs=4, num_kv_blocks=12)
    eng = engine(model_dir, max_num_seqs=4, num_kv_blocks=12)
    assert outputs(eng, PROMPTS, params) == expected
    assert eng.stats()["batching"]["preemptions"] > 0 and rounds_seen
    assert eng.block_manager.num_free_blocks() == eng.num_blocks


def test_a_sequence_displaced_under_fair_gives_back_its_row(model_dir, rounds_seen):
    """Policy fair, two seats: after rounds gave both choices of an n = 2 request a device row, a
    later request displaces the second choice. The displaced sequence gives its row back (there
    is one per seat; on the GPU a served hostile load ran out of them), and every text is plain
    decoding's."""
    def run(**flags):
        eng = engine(model_dir, max_num_seqs=2, scheduling_policy="fair", **flags)
        eng.add_request("many", PROMPTS[0], SamplingParams(n=2, max_tokens=40, **GREEDY))
        for _ in range(4):
            eng.step()
        eng.add_request("one", PROMPTS[1], SamplingParams(max_tokens=24, **GREEDY), share_rank=0)
        tokens, waited = {}, False
        while eng.has_unfinished():
            for out in eng.step():
                for c in out.outputs:
                    tokens[(out.request_id, c.index)] = list(c.token_ids)
            if eng.multi_step is not None and eng.scheduler.waiting:  # displaced: it holds no row while it waits
                waited = True
                assert not {seq.seq_id for seq in eng.scheduler.waiting} & set(eng.multi_step.rounds._rows)
        assert waited or eng.multi_step is None
        return tokens, eng

    expected, _ = run(num_scheduler_steps=1)
    rounds_seen.clear()
    got, eng = run()
    assert got == expected and rounds_seen
    assert eng.stats()["batching"]["preemptions"] > 0
    assert eng.block_manager.num_free_blocks() == eng.num_blocks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rounds_in_cuda_graphs_give_plain_greedy_text_and_sample():
    """The built-in model on stdlib text with real CUDA graphs (float32, so that the equality
    checked is the bookkeeping's): greedy rounds give plain decoding's tokens; sampled rounds
    give every request its max_tokens."""
    from vibee.bench.report import stdlib_workload
    from vibee.runtime.config import EngineConfig
    from vibee.runtime.engine import LLMEngine

    def gpu_engine(steps):
        knobs = {"continuous_batch": {"num_scheduler_steps": steps, "max_num_seqs": 6}}
        return LLMEngine(EngineConfig(device="cuda", dtype="float32", knobs=knobs), progress=False)

    plain = gpu_engine(1)
    work = stdlib_workload(lambda t: plain.tokenizer.encode(t, add_special_tokens=False), 8, (64, 256), (40, 96), 0)
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in work.output_lens]
    expected = outputs(plain, work.prompts, params)
    del plain
    eng = gpu_engine(8)
    assert outputs(eng, work.prompts, params) == expected
    figures = eng.stats()["batching"]["multi_step"]
    assert figures["steps"] > 0 and figures["captured"]
    sampled = generate(eng, work.prompts, SamplingParams(max_tokens=50, temperature=1.0, ignore_eos=True))
    assert [len(out.outputs[0].token_ids) for out in sampled] == [50] * len(work.prompts)


@pytest.mark.parametrize("speculating", [False, True])
def test_with_speculation_rounds_run_while_the_speed_gate_holds_plain_decoding(model_dir, rounds_seen, speculating):
    """--speculative measures speculation against plain decoding as it would run: in multi-steps
    while the speed gate holds plain decoding, and never while it speculates."""
    from vibee.runtime.speed_gate import SpeedGate

    params = SamplingParams(max_tokens=30, **GREEDY)
    expected = plain(model_dir, PROMPTS[:2], params, max_num_seqs=2)
    eng = engine(model_dir, max_num_seqs=2, speculative=True)
    eng.speed_gate = SpeedGate.held(speculating)
    recorded = []
    real = eng.speed_gate.record
    eng.speed_gate.record = lambda tokens, seconds, prefill=False, forwards=1: recorded.append(forwards) or real(
        tokens, seconds, prefill=prefill, forwards=forwards)
    assert outputs(eng, PROMPTS[:2], params) == expected
    assert bool(rounds_seen) != speculating
    if not speculating:  # the gate counts decode forwards: a step reporting a multi-step's tokens counts its rounds
        assert sorted(r for r in recorded if r > 1) == sorted(r for _, r in rounds_seen)
