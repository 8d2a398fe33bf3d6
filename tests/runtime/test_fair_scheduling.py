"""The scheduler's "fair" policy in the engine: a request of many choices takes turns with the
requests after it instead of going first whole (fcfs), and nothing it asked for is lost."""

from __future__ import annotations

import pytest

from tests.runtime.hf_models import make_model
from vibee.engine_flags import split_flags
from vibee.runtime.config import EngineConfig
from vibee.runtime.engine import LLMEngine
from vibee.runtime.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fair-llama")
    make_model(path, "llama", hidden=64, heads=4, kv_heads=2, layers=2)
    return path


def first_token_steps(model_dir, policy):
    """Steps until each request's first token: a greedy n=6 request, then two of n=1, two
    sequences running at a time."""
    settings, knobs = split_flags({"scheduling_policy": policy, "max_num_seqs": 2})
    eng = LLMEngine(EngineConfig(model=model_dir, device="cpu", **settings, knobs=knobs), progress=False)
    params = dict(temperature=0.0, ignore_eos=True, max_tokens=6)
    eng.add_request("many", [5, 6, 7], SamplingParams(n=6, **params))
    eng.add_request("one", [8, 9], SamplingParams(**params))
    eng.add_request("two", [10, 11, 12], SamplingParams(**params), share_rank=0)
    first, tokens, step = {}, {}, 0
    while eng.has_unfinished():
        step += 1
        for out in eng.step():
            if any(c.token_ids for c in out.outputs):
                first.setdefault(out.request_id, step)
            for c in out.outputs:  # an output reports the choices that changed
                tokens.setdefault(out.request_id, {})[c.index] = len(c.token_ids)
    return first, {rid: [counts[i] for i in sorted(counts)] for rid, counts in tokens.items()}


def test_fair_policy_serves_later_requests_between_choices(model_dir):
    fair, fair_tokens = first_token_steps(model_dir, "fair")
    fcfs, fcfs_tokens = first_token_steps(model_dir, "fcfs")
    # fcfs: the n=6 request's choices all run before the others start; fair: after its first one.
    assert fcfs["one"] > fcfs["many"] + 10
    assert fair["one"] <= fair["many"] + 2 and fair["two"] < fcfs["two"]
    assert fair_tokens == fcfs_tokens == {"many": [6] * 6, "one": [6], "two": [6]}
