"""The engine over tensor-parallel ranks on the CPU (gloo): rank 0 schedules and samples, the
workers it launches mirror each forward over their shards and KV caches; the greedy tokens are
the tp = 1 engine's, with float and int8 weights, through swap preemption and with speculative
decoding, and a worker that dies ends the engine's steps with the reason."""

from __future__ import annotations

import shutil

import pytest
from torch import nn

from tests.runtime.hf_models import make_model
from tests.spec_edit import with_knob
from vibee.runtime.generated import REPO_ROOT
from vibee.runtime.offline import generate
from vibee.engine_flags import split_flags
from vibee.runtime.config import EngineConfig
from vibee.runtime.engine import LLMEngine
from vibee.runtime.rank_group import RankLost
from vibee.runtime.sampling_params import SamplingParams
from vibee.runtime.speed_gate import SpeedGate

pytestmark = pytest.mark.slow
PROMPTS = ["def add(a, b):", "import os\nimport sys\n", "class Stack:\n    def push(self, item", "for i in range("]


def engine(model=None, **flags) -> LLMEngine:
    settings, knobs = split_flags(flags)
    return LLMEngine(EngineConfig(model=model, device="cpu", **settings, knobs=knobs), progress=False)


def greedy(eng: LLMEngine, max_tokens: int = 24, prompts=PROMPTS, close: bool = True) -> dict[str, list[int]]:
    """Every prompt at once (they batch and finish at different steps), greedy; the engine closed
    after (unless close is False)."""
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        for i, text in enumerate(prompts):
            eng.add_request(str(i), eng.tokenizer.encode(text)[: 4 + 3 * i], params)
        out = {}
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    out[o.request_id] = o.outputs[0].token_ids
        return out
    finally:
        if close:
            eng.close()


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory):
    """A transformers-saved Llama: 4 query heads, 2 KV heads (over 4 ranks each holds a copy of one)."""
    path = tmp_path_factory.mktemp("tp-engine") / "llama"
    make_model(path, "llama", hidden=64, heads=4, kv_heads=2, layers=2)
    return path


def scored(eng: LLMEngine) -> list[float]:
    """The prompt logprobs of PROMPTS[0] (prompt_logprobs: the workers mirror the scoring forward)."""
    (out,) = generate(eng, [eng.tokenizer.encode(PROMPTS[0])], SamplingParams(max_tokens=1, prompt_logprobs=0))
    return [e.logprob for e in out.prompt_logprobs[1:]]


@pytest.fixture(scope="module")
def one_rank():
    """quant -> (scored, greedy) of the one-rank engine of the built-in model, each run once per module."""
    done = {}

    def get(quant: str) -> tuple[list[float], dict[str, list[int]]]:
        if quant not in done:
            one = engine(quant=quant)
            done[quant] = scored(one), greedy(one)
        return done[quant]

    return get


@pytest.fixture(scope="module")
def gqa_greedy(gqa_dir):
    """The one-rank engine's greedy tokens of the GQA model, 40 a prompt (a test wanting fewer takes their prefix)."""
    return greedy(engine(gqa_dir), max_tokens=40)


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_two_ranks_give_the_one_rank_greedy_tokens_on_the_built_in_model(quant, one_rank):
    expected_scores, expected = one_rank(quant)
    eng = engine(quant=quant, tensor_parallel_size=2)
    assert eng.ranks.size == 2 and eng.num_kv_heads == eng.model_config.num_kv_heads // 2
    info = eng.info()["tensor_parallel"]
    assert info["enabled"] and info["tp_size"] == 2 and info["backend"] == "gloo" and info["rank_devices"] == ["cpu"] * 2
    # int8 layers compute in bf16: each rank's partial sums are rounded to it before the all-reduce
    assert scored(eng) == pytest.approx(expected_scores, abs=1e-4 if quant == "none" else 0.05)
    assert greedy(eng) == expected


def test_a_plan_that_replicates_the_mlp_serves_it_whole_and_still_gives_the_one_rank_tokens(tmp_path, one_rank):
    """The spec's sharding plan decides what each rank holds: here every MLP stays whole."""
    spec_dir = tmp_path / "specs"
    shutil.copytree(REPO_ROOT / "specs" / "tri", spec_dir)
    path = spec_dir / "igla_tensor_parallel.vibee"
    path.write_text(with_knob(with_knob(path.read_text(), "gate_up_proj", "replicated"), "down_proj", "replicated"))
    _, expected = one_rank("none")
    eng = engine(spec_dir=spec_dir, tensor_parallel_size=2)
    layer = eng.model.model.layers[0]
    assert type(layer.mlp.down_proj) is nn.Linear and type(layer.mlp.gate_up_proj) is nn.Linear
    assert isinstance(layer.self_attn.o_proj, eng.gen.tensor_parallel.RowParallelLinear)
    assert greedy(eng) == expected


def test_four_ranks_over_two_kv_heads_give_the_one_rank_tokens(gqa_dir, gqa_greedy):
    eng = engine(gqa_dir, tensor_parallel_size=4)
    assert eng.num_kv_heads == 1 and len(eng.ranks.workers) == 3
    assert greedy(eng, max_tokens=12) == {i: tokens[:12] for i, tokens in gqa_greedy.items()}


def test_swap_preemption_is_mirrored_by_the_workers_then_a_worker_that_dies_ends_the_steps_with_the_reason(
        gqa_dir, gqa_greedy):
    """Few KV blocks: sequences are swapped out and back on every rank alike. Then (one rank group
    for both checks) a worker is killed: the engine's next check and steps raise with the reason."""
    eng = engine(gqa_dir, tensor_parallel_size=2, num_kv_blocks=9, preemption_mode="swap")
    try:
        got = greedy(eng, max_tokens=40, close=False)
        assert eng.report.totals["preemptions"] > 0
        assert got == gqa_greedy
        eng.ranks.workers[0].kill()
        eng.ranks.workers[0].wait()
        with pytest.raises(RankLost, match=r"rank 1 exited \(exit code -9\)"):
            eng.ranks.check()
        eng.add_request("a", [1, 2, 3], SamplingParams(max_tokens=4))
        with pytest.raises(RankLost, match="rank 1 exited"):
            for _ in range(3):
                eng.step()
    finally:
        eng.close()


def speculating(eng: LLMEngine, figures: dict) -> LLMEngine:
    """eng drafting at every step (no speed gate), its speculation figures kept in `figures` as it closes."""
    eng.speed_gate = SpeedGate.held()
    close = eng.close

    def closing():
        figures.update(eng.stats()["speculative_decoding"])
        close()

    eng.close = closing
    return eng


@pytest.mark.parametrize("method", ["ngram", "draft_model", "medusa"])
def test_speculation_over_two_ranks_drafts_and_accepts_as_one_rank_does(method, gqa_dir):
    """Rank 0 drafts (n-gram, its own unsharded draft model, or Medusa heads, which the workers run
    beside it over the vocab-parallel lm_head) and the workers mirror the verifying forward: the
    same tokens and the same drafts accepted at the same places as on one rank (whose tokens are
    plain decoding's: the speculation tests)."""
    flags = {"ngram": dict(speculative=True), "draft_model": dict(model=gqa_dir, draft_model=gqa_dir),
             "medusa": dict(speculative_method="medusa")}[method]
    one, two = {}, {}
    expected = greedy(speculating(engine(**flags, num_speculative_tokens=3), one), max_tokens=16)
    assert greedy(speculating(engine(**flags, num_speculative_tokens=3, tensor_parallel_size=2), two), max_tokens=16) == expected
    assert two["num_accepted_tokens"] > 0 and two["num_drafts"] > 0
    assert {k: two[k] for k in ("num_drafts", "num_accepted_tokens", "accepted_at_position")} == {
        k: one[k] for k in ("num_drafts", "num_accepted_tokens", "accepted_at_position")}


def test_quantized_groups_that_cut_across_a_shard_are_refused_with_the_size_to_use():
    with pytest.raises(ValueError, match=r"o_proj: its 384 input features in groups of 128 do not split into whole "
                                         r"groups over 2 ranks \(192 each\): quantize with --group-size 64"):
        engine(quant="int4", tensor_parallel_size=2)
