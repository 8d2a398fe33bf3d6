"""The speculative_decode spec drives the generated code: change one knob in the shipped spec, and
the module given the IR's values (as the engine gives them) behaves differently, or the spec is
refused with a clear error. Every knob is a runtime value: none is baked into the module."""

from __future__ import annotations

import json
import re

import pytest
import torch

from spec_edit import with_knob
from vibee.frontend.errors import SpecError

NAME = "igla_speculative_decode"



@pytest.fixture
def shipped(spec_text, gen_from_text):
    return gen_from_text(spec_text("speculative_decode"), NAME)


# A context whose 3-gram tail [1, 2, 3] recurs only at the start (followed by 7), while its
# 2-gram tail [2, 3] recurs later (followed by 8).
LONG_VS_RECENT = [1, 2, 3, 7, 9, 2, 3, 8, 5, 1, 2, 3]
REPEATING = list(range(40)) + [0, 1, 2]


def ngram_drafter(gen):
    """The generated NgramDrafter with the spec's k and n-gram sizes, passed as the engine does."""
    cfg = gen.spec.config
    return gen.impl.NgramDrafter(cfg.num_speculative_tokens, cfg.ngram.min_n, cfg.ngram.max_n)


def test_num_speculative_tokens_sets_the_proposal_length(spec_text, gen_from_text, shipped):
    two = gen_from_text(with_knob(spec_text("speculative_decode"), "num_speculative_tokens", "2"), NAME)
    assert ngram_drafter(shipped).propose(REPEATING) == [3, 4, 5, 6]
    assert ngram_drafter(two).propose(REPEATING) == [3, 4]
    model = lambda contexts: torch.zeros(len(contexts), 5)  # noqa: E731 - a draft model with flat logits
    assert two.impl.DraftModelDrafter(model, two.spec.config.num_speculative_tokens).propose([[1]])[0].shape == (1, 2)
    assert two.impl.AcceptanceTracker(two.spec.config.num_speculative_tokens).stats().accepted_at_position == [0, 0]


def test_ngram_max_n_decides_which_match_wins(spec_text, gen_from_text, shipped):
    text = spec_text("speculative_decode")
    bigram = gen_from_text(with_knob(text, "max_n", "2"), NAME)
    assert ngram_drafter(shipped).propose(LONG_VS_RECENT) == [7, 9, 2, 3]
    assert ngram_drafter(bigram).propose(LONG_VS_RECENT) == [8, 5, 1, 2]


def test_ngram_min_n_refuses_short_matches(spec_text, gen_from_text, shipped):
    strict = gen_from_text(with_knob(spec_text("speculative_decode"), "min_n", "2"), NAME)
    context = [4, 7, 1, 2, 4]  # only the single token 4 recurs
    assert ngram_drafter(shipped).propose(context) == [7, 1, 2, 4]
    assert ngram_drafter(strict).propose(context) == []


def sampled_verification(gen):
    """Verify drafts of token 1 against a target whose argmax is 0 (p = 0.5, 0.3, 0.1, 0.1) at
    temperature 1 with the spec's rule; returns the fraction of drafts whose first token survived."""
    draws, k = 4000, gen.spec.config.num_speculative_tokens
    logits = torch.tensor([0.5, 0.3, 0.1, 0.1]).log().repeat(draws, k + 1, 1)
    draft = torch.ones(draws, k, dtype=torch.long)
    outputs, num_accepted = gen.impl.verify_draft(draft, None, logits, 1.0, gen.spec.config.verification,
                                                  torch.Generator().manual_seed(0))
    return outputs, float((num_accepted > 0).double().mean())


def test_verification_greedy_versus_rejection_sampling(spec_text, gen_from_text, shipped):
    greedy = gen_from_text(with_knob(spec_text("speculative_decode"), "verification", "greedy"), NAME)
    outputs, survived = sampled_verification(greedy)
    assert survived == 0.0 and all(tokens == [0] for tokens in outputs)  # only argmax matches count
    outputs, survived = sampled_verification(shipped)
    assert survived == pytest.approx(0.3, abs=0.04)  # p(1): accepted with probability min(1, p/q)
    assert {tokens[0] for tokens in outputs} == {0, 1, 2, 3}
    # The generated suite follows the knob: it passes for the greedy spec as written.
    assert greedy.run_tests() == 0


def test_disable_by_batch_size_null_keeps_speculation_on(spec_text, gen_from_text, shipped):
    always = gen_from_text(with_knob(spec_text("speculative_decode"), "disable_by_batch_size", "null"), NAME)
    limit = shipped.spec.config.disable_by_batch_size
    assert limit == 32 and always.spec.config.disable_by_batch_size is None
    assert shipped.impl.speculation_enabled(32, limit) and not shipped.impl.speculation_enabled(33, limit)
    assert always.impl.speculation_enabled(10_000, None)


def test_zero_speculative_tokens_is_refused(spec_text, gen_from_text):
    with pytest.raises(SpecError) as refused:
        gen_from_text(with_knob(spec_text("speculative_decode"), "num_speculative_tokens", "0"), NAME)
    message = str(refused.value)
    assert "num_speculative_tokens must be between 1 and 16, got 0" in message
    assert re.search(r"\.vibee:\d+:\d+: error:", message)


def test_unknown_method_is_refused_with_the_allowed_ones(spec_text, gen_from_text):
    with pytest.raises(SpecError) as refused:
        gen_from_text(with_knob(spec_text("speculative_decode"), "method", "eagle"), NAME)
    message = str(refused.value)
    assert "'eagle'" in message
    assert "ngram" in message and "draft_model" in message and "medusa" in message


def test_ngram_sizes_out_of_order_are_refused(spec_text, gen_from_text):
    text = with_knob(with_knob(spec_text("speculative_decode"), "min_n", "3"), "max_n", "2")
    with pytest.raises(SpecError, match=r"min_n \(3\) must not exceed ngram.max_n \(2\)"):
        gen_from_text(text, NAME)


def gate_after(gen, accepted: int, drafted: int):
    """The generated gate at the spec's threshold after one sequence's one-token drafts: `accepted`
    kept, then the rest rejected, filling exactly its window."""
    gate = gen.impl.SpeculationGate(gen.spec.config.acceptance_threshold, window_tokens=drafted)
    for i in range(drafted):
        gate.record(0, 1, int(i < accepted))
    return gate


def test_acceptance_threshold_decides_when_a_sequence_stops_drafting(spec_text, gen_from_text, shipped):
    strict = gen_from_text(with_knob(spec_text("speculative_decode"), "acceptance_threshold", "0.5"), NAME)
    assert shipped.spec.config.acceptance_threshold == 0.2
    assert gate_after(shipped, 3, 10).allows(0)  # 30% accepted: pays under the shipped threshold
    assert not gate_after(strict, 3, 10).allows(0)
    assert gate_after(strict, 5, 10).allows(0)
    # The generated suite follows the knob: it passes for the stricter spec as written.
    assert strict.run_tests("-k", "gate") == 0


@pytest.mark.parametrize("value", ["1.0", "-0.1"])
def test_acceptance_threshold_outside_zero_to_one_is_refused(spec_text, gen_from_text, value):
    with pytest.raises(SpecError) as refused:
        gen_from_text(with_knob(spec_text("speculative_decode"), "acceptance_threshold", value), NAME)
    message = str(refused.value)
    assert "acceptance_threshold must be at least 0 and below 1" in message
    assert re.search(r"\.vibee:\d+:\d+: error:", message)


def test_explain_predicts_the_speedup_at_a_given_acceptance():
    from click.testing import CliRunner

    from vibee.cli import main

    result = CliRunner().invoke(main, ["explain", "--json", "--acceptance", "0.8", "specs/tri/igla_speculative_decode.vibee"])
    assert result.exit_code == 0, result.output
    derived = json.loads(result.output)["derived"]
    (table_name,) = [name for name in derived if name.startswith("predicted speed-up")]
    assert "k = 4" in table_name and "c = 0" in table_name
    # k = 4, a = 0.8: 1 / (0.2 + 0.2) = 2.5; 1 + .8 + .64 + .512 + .4096 = 3.3616.
    assert derived[table_name] == {"acceptance 0.8": {"tokens per target forward E": 3.36,
                                                      "original formula 1/(1-a+a/k)": 2.5,
                                                      "standard form E/(1+k*c)": 3.36}}
    default = json.loads(CliRunner().invoke(main, ["explain", "--json", "specs/tri/igla_speculative_decode.vibee"]).output)
    assert len(default["derived"][table_name]) > 1
