"""Draft-model speculation in rounds on the device (vibee/runtime/draft_rounds.py): the draft's
k forwards, the target's verification and the acceptance in one replay per round. Greedy
speculation never changes the text, so the tests compare with plain decoding; a draft that is the
target itself must have every draft accepted, which fails if the draft's K/V are misplaced or
stale (a wrong draft K/V gives wrong drafts, not wrong text)."""

from __future__ import annotations

import pytest
import torch

from tests.runtime.hf_models import make_model
from tests.runtime.test_engine import GREEDY, engine
from tests.runtime.test_ngram_rounds import CHAINED, PROMPTS, outputs, rounds_seen  # noqa: F401 - the fixture
from vibee.runtime.sampling_params import SamplingParams
from vibee.runtime.speed_gate import SpeedGate


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("draft-rounds-llama")
    make_model(directory, "llama", hidden=64, heads=4, kv_heads=2, layers=2)
    return directory


@pytest.fixture(scope="module")
def small_draft(model_dir, tmp_path_factory):
    """The target with noise on its last layer's MLP output: drafts that often, not always, hold."""
    import shutil

    from safetensors.torch import load_file, save_file

    directory = tmp_path_factory.mktemp("draft-rounds-draft")
    for path in model_dir.iterdir():
        shutil.copy(path, directory / path.name)
    weights_file = next(directory.glob("*.safetensors"))
    weights = load_file(weights_file)
    name = next(n for n in weights if n.endswith("layers.1.mlp.down_proj.weight"))
    generator = torch.Generator().manual_seed(0)
    weights[name] = weights[name] + 1 * weights[name].std() * torch.randn(weights[name].shape, generator=generator)
    save_file(weights, weights_file, metadata={"format": "pt"})
    return directory


def drafting(model_dir, draft, **flags):
    eng = engine(model_dir, draft_model=draft, **flags)
    eng.speed_gate = SpeedGate.held()  # speculating throughout
    return eng


@pytest.mark.parametrize("max_num_seqs", [1, 3])
def test_the_target_as_its_own_draft_has_every_draft_accepted_in_rounds(model_dir, rounds_seen, max_num_seqs):
    params = SamplingParams(max_tokens=41, **GREEDY)
    plain = outputs(engine(model_dir, max_num_seqs=max_num_seqs), PROMPTS, params)
    eng = drafting(model_dir, model_dir, max_num_seqs=max_num_seqs, num_speculative_tokens=3)
    assert outputs(eng, PROMPTS, params) == plain
    assert rounds_seen and max(batch for batch, _ in rounds_seen) == max_num_seqs
    assert True in CHAINED  # the draft's K/V stay right in rounds queued behind unread ones
    figures = eng.stats()["speculative_decoding"]
    assert figures["device_rounds"]["rounds"] > 0
    assert figures["acceptance_rate"] == 1.0 and figures["num_draft_tokens"] > 0
    assert eng.block_manager.num_free_blocks() == eng.num_blocks
    assert not eng.speculator.rounds._rows and not eng.speculator.rounds.proposer.valid


def verifications(eng, prompts, params) -> list[list[tuple[int, int]]]:
    """Each request's (drafted, accepted) per verification, one request at a time."""
    seen: list[tuple[int, int]] = []
    real = eng.speculator.acceptance.update
    eng.speculator.acceptance.update = lambda drafted, accepted: (seen.append((drafted, accepted)), real(drafted, accepted))
    per_request = []
    for prompt in prompts:
        seen.clear()
        outputs(eng, [prompt], params)
        per_request.append(list(seen))
    return per_request


def test_a_smaller_draft_in_rounds_drafts_what_the_host_drafts(model_dir, small_draft, rounds_seen):
    """Greedy drafts from the same draft model over the same tokens are the same whether the host
    or a round computes them: each request's verifications match the host path's, one for one
    (but for the last < k + 1 tokens, which after rounds decode plainly; the acceptance gate off:
    on the host it pauses drafting, which rounds don't)."""
    params = SamplingParams(max_tokens=40, **GREEDY)
    plain = outputs(engine(model_dir, max_num_seqs=1), PROMPTS, params)
    eng = drafting(model_dir, small_draft, max_num_seqs=1, speculative_acceptance_threshold=0)
    assert outputs(eng, PROMPTS, params) == plain
    in_rounds = verifications(eng, PROMPTS, params)
    assert rounds_seen and eng.stats()["speculative_decoding"]["device_rounds"]["rounds"] > 0
    host = drafting(model_dir, small_draft, max_num_seqs=1, speculative_acceptance_threshold=0)
    host.speculator.rounds = None  # every draft from DraftRunner.propose on the host
    on_host = verifications(host, PROMPTS, params)
    k = eng.speculator.num_speculative_tokens
    for rounds_side, host_side in zip(in_rounds, on_host):
        # Drafting may start a step apart (a rest step after the prompt); from the host path's
        # second verification to its tail the same verifications follow each other in rounds.
        middle = [v for v in host_side[1:] if v[0] == k]
        assert len(middle) >= 10 and any(rounds_side[i: i + len(middle)] == middle for i in range(len(rounds_side)))
    accepted = [a for request in in_rounds for _, a in request]
    assert 0 < sum(accepted) < k * len(accepted)  # drafts that sometimes hold


def scribble(cache) -> None:
    """What host drafting through its own block manager may do to the blocks rounds hold."""
    for pages in cache.k_pages + cache.v_pages:
        pages.data.normal_()


def test_host_drafting_and_rounds_take_turns_without_stale_draft_state(model_dir, rounds_seen):
    """Rounds, then host drafting (a sampled request joins: every sequence drafts on the host,
    into the draft cache through its own blocks, which may be the rounds' blocks), then rounds
    again: the draft K/V rounds held are caught up anew, so with the target drafting for itself
    every draft of the greedy sequence holds again. Rounds likewise leave the host drafter
    nothing it believes it holds."""
    eng = drafting(model_dir, model_dir, max_num_seqs=2, num_speculative_tokens=3)
    greedy = SamplingParams(max_tokens=150, **GREEDY)
    plain = outputs(engine(model_dir, max_num_seqs=2), PROMPTS[:1], greedy)
    eng.add_request("greedy", PROMPTS[0], greedy)
    done, phase, scribbled, rounds_steps_before = {}, "rounds", False, 0
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
                if out.request_id == "sampled":  # from here on only the greedy sequence drafts
                    eng.speculator.acceptance.reset()
                    phase, rounds_steps_before = "rounds again", eng.speculator.rounds.num_steps
        if phase == "rounds" and len(rounds_seen) >= 2:
            assert not eng.speculator.drafter.fed
            eng.add_request("sampled", PROMPTS[3], SamplingParams(max_tokens=8, temperature=0.8, seed=2))
            phase = "host"
        elif phase == "host" and eng.speculator.drafter.fed and not scribbled:
            scribble(eng.speculator.drafter.cache)
            scribbled = True
        elif phase == "rounds again" and eng.speculator.rounds.num_steps > rounds_steps_before:
            assert not eng.speculator.drafter.fed  # what the host drafter held is no longer trusted
    assert done["greedy"] == plain[0][0][0]
    assert scribbled and phase == "rounds again"
    figures = eng.stats()["speculative_decoding"]
    assert figures["device_rounds"]["steps"] > 2 and figures["num_draft_tokens"] > 0
    assert figures["acceptance_rate"] == 1.0


@pytest.mark.parametrize("in_rounds", [True, False])
def test_the_speed_gate_does_not_time_the_drafts_catching_up_on_a_prompt(model_dir, small_draft, rounds_seen, in_rounds):
    """A new sequence's first drafting step runs the draft over its whole prompt, as a prefill
    (on the H200 ~10 ms against ~4 ms for a step of 8 rounds): the speed gate is told, as for the
    target's prefill, so a probe does not judge drafting by it. Steady drafting steps are timed."""
    eng = drafting(model_dir, small_draft, max_num_seqs=1, speculative_acceptance_threshold=0)  # no pauses
    if not in_rounds:
        eng.speculator.rounds = None
    flags = []
    real = eng.speed_gate.record
    eng.speed_gate.record = lambda tokens, seconds, *, prefill=False, forwards=1: (
        flags.append(prefill), real(tokens, seconds, prefill=prefill, forwards=forwards))
    caught_up = []
    generate_one = SamplingParams(max_tokens=40, **GREEDY)
    for i, prompt in enumerate(PROMPTS[:2]):
        eng.add_request(f"r{i}", prompt, generate_one)
        while eng.has_unfinished():
            eng.step()
            caught_up.append(eng.speculator.catch_up_tokens)
    assert len(flags) == len(caught_up)
    k = eng.speculator.num_speculative_tokens
    prompt_steps = [i for i, n in enumerate(caught_up) if n > k]
    assert len(prompt_steps) == 2 and all(flags[i] for i in prompt_steps)  # each prompt once, untimed
    steady = [i for i, n in enumerate(caught_up) if 0 < n <= k]
    assert all(not flags[i] for i in steady)
    assert (len(rounds_seen) > 0) == in_rounds


def test_the_ablations_draft_cost_comes_from_the_engines_own_replays_and_leaves_it_intact(model_dir, small_draft, rounds_seen):
    """bench ablation's c for a draft model in rounds: a round less its verification, per draft
    step, over a plain step. Measuring replays padding rows only: the engine then decodes as before."""
    from vibee.bench.ablation import draft_cost

    params = SamplingParams(max_tokens=30, **GREEDY)
    plain = outputs(engine(model_dir, max_num_seqs=2), PROMPTS, params)
    eng = drafting(model_dir, small_draft, max_num_seqs=2)
    assert outputs(eng, PROMPTS[:2], params) == plain[:2]
    times = eng.speculator.rounds.step_times(repeats=3)
    assert set(times) == {"step", "verify", "round"} and all(t > 0 for t in times.values())
    cost, source = draft_cost(eng, eng.speculator.num_speculative_tokens)
    assert source == "step time" and cost >= 0
    assert outputs(eng, PROMPTS, params) == plain  # prefix-cached prompts included
    host = drafting(model_dir, small_draft, max_num_seqs=2)
    host.speculator.rounds = None
    assert draft_cost(host, 4)[1] == "weight bytes"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_draft_rounds_on_the_gpu_keep_greedy_text_in_cuda_graphs():
    """The built-in model and its draft, float32, real CUDA graphs: rounds at batch 1 and 4 give
    plain decoding's tokens, and the target drafting for itself has every draft accepted."""
    from vibee.runtime.config import DEFAULT_DRAFT_MODEL_DIR, DEFAULT_MODEL_DIR, EngineConfig
    from vibee.runtime.engine import LLMEngine
    from vibee.runtime.offline import generate

    def gpu_engine(**flags):
        eng = LLMEngine(EngineConfig(device="cuda", dtype="float32", **flags), progress=False)
        if eng.speculator is not None:
            eng.speed_gate = SpeedGate.held()
        return eng

    params = SamplingParams(max_tokens=48, **GREEDY)
    prompts = [[11, 12, 13] * 6, list(range(100, 140)), [7] * 9, [300 + i % 5 for i in range(30)]]
    for max_num_seqs in (1, 4):
        knobs = {"continuous_batch": {"max_num_seqs": max_num_seqs}}
        plain = [o.outputs[0].token_ids for o in generate(gpu_engine(knobs=knobs), prompts, params)]
        for draft in (DEFAULT_DRAFT_MODEL_DIR, DEFAULT_MODEL_DIR):
            eng = gpu_engine(knobs=knobs, draft_model=draft)
            assert eng.speculator.rounds is not None and eng.speculator.rounds.round_graphs
            assert [o.outputs[0].token_ids for o in generate(eng, prompts, params)] == plain
            figures = eng.stats()["speculative_decoding"]
            assert figures["device_rounds"]["rounds"] > 0
            if draft == DEFAULT_MODEL_DIR:
                assert figures["acceptance_rate"] > 0.97  # float32 ties aside, every draft holds
