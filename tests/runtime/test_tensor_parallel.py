"""The model over tensor-parallel ranks (gloo processes on the CPU): each rank holds its shard of
every layer by the spec's plan, and the logits every rank gets equal the unsharded model's."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest
import torch

from tests.runtime.hf_models import make_model
from vibee.runtime.attention import make_attention_batch
from vibee.runtime.generated import load_generated
from vibee.runtime.loader import load_model_dir
from vibee.runtime.model import build_model
from vibee.runtime.tensor_parallel import rank_heads, shard_model

IDS = [3, 17, 42, 99, 5, 250, 7, 61, 12]


def _logits(model_dir: Path, shard=None, gen=None):
    """(logits of IDS, the model, what shard(gen, model) returned): the model built from the
    checkpoint (on gen, default load_generated()), sharded first when given a shard."""
    gen = gen if gen is not None else load_generated()
    model = build_model(load_model_dir(model_dir, dtype=torch.float32, progress=False), gen).eval()
    shape = shard(gen, model) if shard is not None else None
    batch = make_attention_batch([len(IDS)], [len(IDS)], None, 16, "cpu")
    with torch.inference_mode():
        logits = model.compute_logits(model(torch.tensor(IDS), batch.positions(), batch, None))
    return logits, model, shape


SIZES = (4, 2)  # 4: fewer KV heads than ranks, each rank a copy of one


def _rank(rank: int, model_dir: Path, out: Path) -> None:
    """One process (spawned): for each of SIZES it has a rank in, join that gloo group, shard the
    model by the spec's plan, save its logits, leave the group."""
    gen = load_generated()
    tp = gen.tensor_parallel
    plan = gen.config("tensor_parallel")
    kept = []  # the sharded models, alive until the process leaves (below)
    for size in SIZES:
        if rank >= size:
            break
        group = tp.init_tensor_parallel(rank, size, "gloo", init_method=f"file://{out / f'rendezvous{size}'}")

        def shard(gen, model):
            return shard_model(model, tp, rank, size, group, sharding=plan.sharding, gather_output=plan.gather_output)

        try:
            logits, model, shape = _logits(model_dir, shard, gen)
            kept.append(model)
            torch.save({"logits": logits, "heads": (shape.num_heads, shape.num_kv_heads),
                        "qkv_rows": model.model.layers[0].self_attn.qkv_proj.weight.shape[0]},
                       out / f"size{size}-rank{rank}.pt")
        finally:
            tp.destroy_tensor_parallel()
    # Saved and out of the group: leave without the interpreter's teardown, where the sharded
    # layers' last references to the gloo group free it with its threads still joinable
    # ("terminate called without an active exception", SIGABRT, now and then on busy cores).
    os._exit(0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer Llama, 4 query heads and 2 KV heads of 16."""
    model_dir = tmp_path_factory.mktemp("tp-llama")
    make_model(model_dir, "llama", hidden=64, heads=4, kv_heads=2, layers=2)
    return model_dir


def test_sharded_ranks_give_the_unsharded_logits(tiny, tmp_path):
    """Over 4 ranks, then over 2 (one set of processes: ranks 0 and 1 of the four go on to the two)."""
    expected, _, _ = _logits(tiny)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, tiny, tmp_path)) for r in range(max(SIZES))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:  # none left behind: a rank still waiting on a dead peer would hold up the test run's exit
        if p.is_alive():
            p.kill()
            p.join()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    for size in SIZES:
        heads = rank_heads(4, 2, size)
        for r in range(size):
            got = torch.load(tmp_path / f"size{size}-rank{r}.pt")
            assert got["heads"] == heads and got["qkv_rows"] == (heads[0] + 2 * heads[1]) * 16, size
            torch.testing.assert_close(got["logits"], expected, rtol=1e-5, atol=1e-5)


def test_heads_that_do_not_split_are_named():
    assert rank_heads(32, 8, 4) == (8, 2) and rank_heads(32, 8, 16) == (2, 1)
    with pytest.raises(ValueError, match="6 KV heads do not split over --tensor-parallel-size 4"):
        rank_heads(8, 6, 4)
    with pytest.raises(ValueError, match="6 attention heads"):
        rank_heads(6, 2, 4)


def test_a_plan_that_splits_qkv_but_not_o_proj_is_refused(tiny):
    gen = load_generated()
    model = build_model(load_model_dir(tiny, dtype=torch.float32, progress=False), gen)
    plan = gen.config("tensor_parallel")
    with pytest.raises(ValueError, match="shard qkv_proj column and o_proj row"):
        shard_model(model, gen.tensor_parallel, 0, 2, None, sharding={**plan.sharding, "o_proj": "replicated"},
                    gather_output=plan.gather_output)
    with pytest.raises(ValueError, match="gather_output"):
        shard_model(model, gen.tensor_parallel, 0, 2, None, sharding=plan.sharding, gather_output=[])
