"""Whole fresh prompts prefilled as CUDA graphs of length buckets (vibee/runtime/prefill_graphs.py).
On a CPU the graphs are eager replays of the same static buffers (tests/runtime/eager_graphs.py):
padding rows, the padding slot and the last-row index are what a captured graph would run."""

from __future__ import annotations

import pytest
import torch

from tests.runtime.eager_graphs import use_eager_graphs
from tests.runtime.hf_models import make_model
from tests.runtime.test_engine import GREEDY, engine
from vibee.runtime.offline import generate
from vibee.runtime.prefill_graphs import MAX_PREFILL_GRAPH_TOKENS, PrefillGraphs, prefill_graph_sizes
from vibee.runtime.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("prefill-graphs-llama")
    make_model(directory, "llama", hidden=64, heads=4, kv_heads=2, layers=2)
    return directory


@pytest.fixture
def prefilled(monkeypatch):
    """Eager graphs for every engine; returns the prompt length of each prefill graph replay."""
    use_eager_graphs(monkeypatch)
    seen = []
    real = PrefillGraphs.run

    def run(self, token_ids, block_table):
        seen.append(len(token_ids))
        return real(self, token_ids, block_table)

    monkeypatch.setattr(PrefillGraphs, "run", run)
    return seen


def test_buckets_cover_the_longest_prompt_a_graph_takes():
    assert prefill_graph_sizes(100) == [16, 32, 64, 128]
    assert prefill_graph_sizes(64) == [16, 32, 64]
    assert prefill_graph_sizes(10**6)[-1] == MAX_PREFILL_GRAPH_TOKENS


def prompts(lengths):
    return [[(7 * i + 3 * n) % 200 + 1 for i in range(n)] for n in lengths]


ONE_STEP = {"num_scheduler_steps": 1}
LENGTHS = [5, 16, 17, 40]  # inside, at and just past bucket edges


@pytest.fixture(scope="module")
def eager_tokens(model_dir):
    """Each temperature's tokens from an engine without graphs (built before any test patches them)."""
    batch = prompts(LENGTHS)
    return {t: [o.outputs[0].token_ids for o in generate(engine(model_dir, max_num_seqs=1, seed=3), batch,
                                                         SamplingParams(max_tokens=6, temperature=t, ignore_eos=True))]
            for t in (0.0, 0.9)}


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_prompts_padded_to_their_bucket_give_the_eager_tokens(model_dir, eager_tokens, prefilled, temperature):
    """One prompt at a time (batch 1): each prefill is a graph replay, and every token is the
    eager engine's (a seeded engine, for the sampled run)."""
    params = SamplingParams(max_tokens=6, temperature=temperature, ignore_eos=True)
    graphs = generate(engine(model_dir, max_num_seqs=1, seed=3, num_scheduler_steps=1), prompts(LENGTHS), params)
    assert [o.outputs[0].token_ids for o in graphs] == eager_tokens[temperature]
    assert prefilled == LENGTHS


def test_steps_that_are_not_one_whole_fresh_prompt_run_eagerly(model_dir, prefilled):
    """Several prompts in one step, a prompt past the largest bucket (chunked), and a prompt whose
    start the prefix cache holds: eager, and the same tokens."""
    # One step at a time: device rounds on a CPU need the Triton interpreter, which a GPU machine
    # runs this test without.
    params = SamplingParams(max_tokens=4, **GREEDY)
    together = prompts([9, 12])
    assert [o.outputs[0].token_ids for o in generate(engine(model_dir, max_num_seqs=2, **ONE_STEP), together, params)] == \
        [o.outputs[0].token_ids for o in generate(engine(model_dir, max_num_seqs=1, **ONE_STEP), together, params)]
    long_prompt = prompts([70])
    eng = engine(model_dir, max_num_seqs=1, max_num_batched_tokens=32, **ONE_STEP)  # buckets up to 32; the prompt is chunked
    generate(eng, long_prompt, params)
    cached = engine(model_dir, max_num_seqs=1, **ONE_STEP)
    first = prompts([40])[0]
    generate(cached, [first], params)
    generate(cached, [first[:32] + [5, 6, 7]], params)  # its first two blocks are cache hits
    # Only the one-prompt steps of the max_num_seqs=1 engines replayed: 9 and 12, then 40 (a miss).
    assert prefilled == [9, 12, 40]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_prefills_give_the_eager_tokens_on_the_gpu(monkeypatch):
    """The built-in model in float32 on stdlib text, one request at a time: prompts prefilled by
    real graph replays give the tokens of eager prefills."""
    from vibee.bench.report import stdlib_workload
    from vibee.runtime import model_runner
    from vibee.runtime.config import EngineConfig
    from vibee.runtime.engine import LLMEngine

    def gpu_engine():
        knobs = {"continuous_batch": {"max_num_seqs": 1}, "kv_cache": {"enable_prefix_caching": False}}
        return LLMEngine(EngineConfig(device="cuda", dtype="float32", knobs=knobs), progress=False)

    eng = gpu_engine()
    assert eng.runner.prefill_graphs is not None
    replayed = []
    real = eng.runner.prefill_graphs.run
    eng.runner.prefill_graphs.run = lambda ids, table: replayed.append(len(ids)) or real(ids, table)
    work = stdlib_workload(lambda t: eng.tokenizer.encode(t, add_special_tokens=False), 4, (20, 600), (24, 24), 0)
    params = SamplingParams(max_tokens=24, **GREEDY)
    got = [o.outputs[0].token_ids for o in generate(eng, work.prompts, params)]
    assert replayed == [len(p) for p in work.prompts if len(p) <= eng.runner.prefill_graphs.sizes[-1]]
    del eng
    monkeypatch.setattr(model_runner, "capture_prefill_graphs", lambda *a, **k: None)
    assert got == [o.outputs[0].token_ids for o in generate(gpu_engine(), work.prompts, params)]
