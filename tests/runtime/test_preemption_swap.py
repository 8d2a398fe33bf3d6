"""Preemption by swap in the engine: with few KV blocks, a preempted sequence's blocks go to host
memory and come back (--preemption-mode swap, --swap-space GiB), and every request finishes with
the greedy tokens of a roomy cache, as it does with recompute; the overlapped step loop, whose
next step is scheduled while the last runs, copies in step order."""

from __future__ import annotations

import pytest

from tests.runtime.test_engine import GREEDY, engine, prompts, run, tiny  # noqa: F401  (tiny: a fixture)
from vibee.runtime.engine import LLMEngine

BATCH = prompts([20, 33, 7, 26, 15, 40], seed=1)
SCARCE = 6  # blocks of 16 tokens: two sequences at most hold their whole KV at once


@pytest.fixture(scope="module")
def roomy(tiny):  # noqa: F811
    model_dir, _ = tiny
    return run(engine(model_dir), BATCH, max_tokens=24, **GREEDY)


def swap_figures(eng) -> dict[str, int]:
    figures = eng.scheduler.measured_stats()
    return {k: figures[k] for k in ("num_preemptions", "num_swap_outs", "num_swap_ins", "num_swap_fallbacks",
                                    "num_used_swap_slots", "num_swapped")}


@pytest.mark.parametrize("overlap", [True, False])
def test_swap_and_recompute_finish_every_request_with_the_roomy_tokens(tiny, roomy, monkeypatch, overlap):  # noqa: F811
    model_dir, _ = tiny
    if not overlap:
        monkeypatch.setattr(LLMEngine, "_can_overlap", lambda self: False)
    recompute = engine(model_dir, num_kv_blocks=SCARCE, preemption_mode="recompute")
    assert run(recompute, BATCH, max_tokens=24, **GREEDY) == roomy
    assert recompute.runner.host_swap is None and swap_figures(recompute)["num_swap_outs"] == 0
    assert recompute.stats()["batching"]["preemptions"] > 0

    swap = engine(model_dir, num_kv_blocks=SCARCE, preemption_mode="swap", swap_space=2 ** -10)  # 1 MiB: 128 slots
    assert swap.runner.host_swap.num_slots == 2**20 // swap.kv_bytes_per_block
    assert run(swap, BATCH, max_tokens=24, **GREEDY) == roomy
    figures = swap_figures(swap)
    assert figures["num_swap_outs"] > 0 and figures["num_swap_ins"] == figures["num_swap_outs"]
    assert figures["num_swap_outs"] == figures["num_preemptions"] and figures["num_swap_fallbacks"] == 0
    assert figures["num_used_swap_slots"] == 0 and figures["num_swapped"] == 0
    assert swap.block_manager.num_free_blocks() == swap.num_blocks
    # Swapped KV is copied back, not prefilled again: fewer prompt tokens computed than with recompute.
    computed = [e.stats()["throughput"]["prefill_tokens_computed"] for e in (swap, recompute)]
    assert computed[0] < computed[1]


def test_a_swap_space_too_small_for_a_victim_recomputes_it(tiny, roomy):  # noqa: F811
    model_dir, _ = tiny
    eng = engine(model_dir, num_kv_blocks=SCARCE, preemption_mode="swap", swap_space=2 ** -20)  # 1 KiB: no slot
    assert eng.runner.host_swap.num_slots == 0
    assert run(eng, BATCH, max_tokens=24, **GREEDY) == roomy
    figures = swap_figures(eng)
    assert figures["num_preemptions"] > 0 and figures["num_swap_fallbacks"] == figures["num_preemptions"]
    assert figures["num_swap_outs"] == 0


def test_swap_without_swap_space_is_refused_naming_the_flag(tiny):  # noqa: F811
    model_dir, _ = tiny
    with pytest.raises(Exception, match="swap_space_gib") as info:
        engine(model_dir, preemption_mode="swap", swap_space=0.0)
    assert "--swap-space" in str(info.value)
