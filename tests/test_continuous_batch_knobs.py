"""The continuous_batch spec drives the generated scheduler: change one knob in the shipped spec,
and the scheduler given the IR's values (as the runtime gives them) behaves differently, or the
spec is refused with a clear error. Every knob is a runtime value: none is baked into the module."""

from __future__ import annotations

import re

import pytest

from spec_edit import with_knob
from vibee.frontend.errors import SpecError

NAME = "igla_continuous_batch"




@pytest.fixture
def shipped(spec_text, gen_from_text):
    return gen_from_text(spec_text("continuous_batch"), NAME)


def scheduler(gen, num_blocks: int, block_size: int):
    """The generated Scheduler with the settings of the spec it was generated from, passed as the runtime does."""
    # The engine turns GiB into host slots, and runs scheduler steps on the device itself.
    settings = gen.spec.config.model_dump(exclude={"swap_space_gib", "num_scheduler_steps"})
    return gen.impl.Scheduler(gen.ref.CountingBlockSpace(num_blocks, block_size), **settings, num_swap_slots=64)


def first_step(gen, prompts, priorities=None, num_blocks=256, block_size=16):
    """(seq_id, num_new_tokens) of the first step of a scheduler with the spec's settings."""
    sched = scheduler(gen, num_blocks, block_size)
    for i, prompt in enumerate(prompts):
        priority = priorities[i] if priorities else 0
        sched.add(gen.impl.Sequence(i, prompt, max_tokens=4, priority=priority))
    return [(item.seq.seq_id, item.num_new_tokens) for item in sched.schedule().scheduled]


def test_policy_priority_changes_the_admission_order(spec_text, gen_from_text, shipped):
    by_priority = gen_from_text(with_knob(spec_text("continuous_batch"), "policy", "priority"), NAME)
    prompts, priorities = [[1, 2], [3, 4], [5, 6]], [2, 0, 1]
    assert [i for i, _ in first_step(shipped, prompts, priorities)] == [0, 1, 2]
    assert [i for i, _ in first_step(by_priority, prompts, priorities)] == [1, 2, 0]
    assert by_priority.run_tests() == 0  # the generated suite holds for the changed spec too


def test_max_num_seqs_limits_the_batch(spec_text, gen_from_text, shipped):
    two = gen_from_text(with_knob(spec_text("continuous_batch"), "max_num_seqs", "2"), NAME)
    prompts = [[i, i + 1, i + 2] for i in range(5)]
    assert len(first_step(shipped, prompts)) == 5
    assert len(first_step(two, prompts)) == 2


def test_max_num_batched_tokens_is_the_step_budget(spec_text, gen_from_text, shipped):
    small = gen_from_text(with_knob(spec_text("continuous_batch"), "max_num_batched_tokens", "300"), NAME)
    prompts = [[7] * 200, [8] * 200]
    assert first_step(shipped, prompts) == [(0, 200), (1, 200)]
    assert first_step(small, prompts) == [(0, 200), (1, 100)]  # the second prompt is split


def test_long_prefill_token_threshold_caps_each_chunk(spec_text, gen_from_text, shipped):
    capped = gen_from_text(with_knob(spec_text("continuous_batch"), "long_prefill_token_threshold", "64"), NAME)
    prompts = [[7] * 200, [8] * 10]
    assert first_step(shipped, prompts) == [(0, 200), (1, 10)]
    assert first_step(capped, prompts) == [(0, 64), (1, 10)]


def test_disabling_chunked_prefill_refuses_a_long_prompt(spec_text, gen_from_text, shipped):
    whole = gen_from_text(with_knob(spec_text("continuous_batch"), "enable_chunked_prefill", "false"), NAME)
    long_prompt = [5] * 9000  # longer than the 8192-token budget
    sched = scheduler(shipped, 1024, 16)
    sched.add(shipped.impl.Sequence(0, long_prompt, max_tokens=2))
    assert [item.num_new_tokens for item in sched.schedule().scheduled] == [8192]
    sched = scheduler(whole, 1024, 16)
    with pytest.raises(ValueError, match="enable_chunked_prefill"):
        sched.add(whole.impl.Sequence(0, long_prompt, max_tokens=2))


def test_watermark_decides_what_can_ever_fit(spec_text, gen_from_text, shipped):
    half = gen_from_text(with_knob(spec_text("continuous_batch"), "watermark", "0.5"), NAME)
    # 100 blocks of 16 tokens; the sequence needs 60 blocks at its longest (955 + 6 - 1 tokens).
    for gen, fits in ((shipped, True), (half, False)):
        sched = scheduler(gen, 100, 16)
        assert sched.can_ever_fit(gen.impl.Sequence(0, [1] * 955, max_tokens=6)) is fits


def spec_error(gen_from_text, text) -> str:
    with pytest.raises(SpecError) as info:
        gen_from_text(text, NAME)
    return str(info.value)


def test_unknown_policy_is_refused_with_the_allowed_ones(spec_text, gen_from_text):
    message = spec_error(gen_from_text, with_knob(spec_text("continuous_batch"), "policy", "lifo"))
    assert "policy" in message and "'fcfs'" in message and "'priority'" in message and "lifo" in message
    assert re.search(r"\.vibee:\d+:\d+: error:", message)


def test_budget_below_max_num_seqs_is_refused_at_its_line(spec_text, gen_from_text):
    text = with_knob(spec_text("continuous_batch"), "max_num_batched_tokens", "100")
    line = next(n for n, s in enumerate(text.splitlines(), 1) if s.lstrip().startswith("max_num_batched_tokens:"))
    message = spec_error(gen_from_text, text)
    assert f":{line}:" in message and "must be at least max_num_seqs (256)" in message


def test_preemption_mode_swap_keeps_a_victims_computed_tokens(spec_text, gen_from_text, shipped):
    swap = gen_from_text(with_knob(spec_text("continuous_batch"), "preemption_mode", "swap"), NAME)
    victims = {}
    for name, gen in (("recompute", shipped), ("swap", swap)):
        sched = scheduler(gen, 4, 4)  # two sequences of 5 tokens (2 blocks each): one gives way when the other grows
        runner = gen.ref.FakeRunner(sched.block_space)
        for i in range(2):
            sched.add(gen.impl.Sequence(i, [i + 1] * 5, max_tokens=6))
        out = sched.schedule()
        for _ in range(8):  # the fourth decode step needs a fifth block
            if out.preempted:
                break
            sched.update(out, runner.execute(out))
            out = sched.schedule()
        victims[name] = (out.preempted[0].status.name, out.preempted[0].num_computed_tokens, len(out.swap_out))
    assert victims["recompute"] == ("PREEMPTED", 0, 0)
    assert victims["swap"][0] == "SWAPPED" and victims["swap"][1] > 0 and victims["swap"][2] == 2
    assert swap.run_tests() == 0  # the generated suite holds for the changed spec too


def test_swap_without_swap_space_is_refused_at_its_line(spec_text, gen_from_text):
    text = with_knob(with_knob(spec_text("continuous_batch"), "preemption_mode", "swap"), "swap_space_gib", "0")
    line = next(n for n, s in enumerate(text.splitlines(), 1) if s.lstrip().startswith("swap_space_gib:"))
    message = spec_error(gen_from_text, text)
    assert f":{line}:" in message and "swap_space_gib above 0" in message
