from __future__ import annotations

import pytest

from vibee.runtime.sampling_params import (
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    SamplingParams,
    SamplingParamsError,
)


def test_defaults():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1, 1.0, 1.0, -1, 0.0, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.stop, p.stop_token_ids, p.ignore_eos, p.logprobs) == (16, [], [], False, None)
    assert p.skip_special_tokens is True and p.include_stop_str_in_output is False
    assert not p.is_greedy and not p.top_k_enabled and not p.has_penalties


@pytest.mark.parametrize(
    "field,value",
    [
        ("n", 1), ("n", MAX_N),
        ("temperature", 0), ("temperature", 0.0), ("temperature", 2.0), ("temperature", 1),
        ("top_p", 1e-6), ("top_p", 1.0),
        ("top_k", -1), ("top_k", 0), ("top_k", 1), ("top_k", 10**6),
        ("min_p", 0.0), ("min_p", 1.0),
        ("presence_penalty", -2.0), ("presence_penalty", 2),
        ("frequency_penalty", -2), ("frequency_penalty", 2.0),
        ("repetition_penalty", 1e-3), ("repetition_penalty", 5.0),
        ("max_tokens", 1),
        ("logprobs", 0), ("logprobs", MAX_LOGPROBS), ("logprobs", None),
        ("seed", 0), ("seed", -(2**63)), ("seed", 2**64 - 1), ("seed", None),
        ("stop_token_ids", [0, 5]),
    ],
)
def test_accepts_boundaries(field, value):
    p = SamplingParams(**{field: value})
    assert getattr(p, field) == value


@pytest.mark.parametrize(
    "field,value",
    [
        ("n", 0), ("n", MAX_N + 1),
        ("temperature", -0.1), ("temperature", 2.01), ("temperature", float("nan")), ("temperature", float("inf")),
        ("temperature", True), ("temperature", "0.5"),
        ("top_p", 0.0), ("top_p", 1.01), ("top_p", -1),
        ("top_k", -2), ("top_k", 1.5),
        ("min_p", -0.01), ("min_p", 1.5),
        ("presence_penalty", 2.5), ("frequency_penalty", -2.01),
        ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
        ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 16.0), ("max_tokens", True),
        ("logprobs", -1), ("logprobs", MAX_LOGPROBS + 1),
        ("seed", 2**64), ("seed", -(2**63) - 1), ("seed", 1.0),
        ("stop", ""), ("stop", ["ok", ""]), ("stop", [1]), ("stop", ["x" * (MAX_STOP_STRING_CHARS + 1)]),
        ("stop", [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]),
        ("stop_token_ids", [-1]), ("stop_token_ids", [True]), ("stop_token_ids", ["3"]), ("stop_token_ids", 3),
        ("ignore_eos", "yes"),
    ],
)
def test_rejects_with_field_named(field, value):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**{field: value})
    err = info.value
    assert isinstance(err, ValueError)
    assert err.field == field
    assert field in str(err)
    assert "\n" not in str(err)


def test_messages_are_readable():
    with pytest.raises(SamplingParamsError, match=r"^temperature must be between 0 and 2, got 3.0$"):
        SamplingParams(temperature=3.0)
    with pytest.raises(SamplingParamsError, match=r"^top_p must be in \(0, 1\], got 0.0$"):
        SamplingParams(top_p=0)


def test_unknown_field_rejected():
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(temprature=0.5)
    assert info.value.field == "temprature"
    assert "unknown" in str(info.value)


def test_stop_normalised_to_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop=("a", "b", "a")).stop == ["a", "b"]  # duplicates dropped, order kept
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []
    assert SamplingParams(stop_token_ids=(7, 7, 3)).stop_token_ids == [7, 3]


def test_assignment_is_validated():
    p = SamplingParams()
    p.temperature = 0.5
    assert p.temperature == 0.5
    with pytest.raises(SamplingParamsError) as info:
        p.top_k = -3
    assert info.value.field == "top_k"
    assert p.top_k == -1


def test_model_validate_paths_convert_errors():
    assert SamplingParams.model_validate({"stop": "x", "n": 2}).stop == ["x"]
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.model_validate({"min_p": 3})
    assert info.value.field == "min_p"
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.model_validate_json('{"logprobs": 50}')
    assert info.value.field == "logprobs"


def test_derived_flags():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=1e-7).is_greedy  # too small to divide by: greedy
    assert not SamplingParams(temperature=0.01).is_greedy
    assert SamplingParams(top_k=5).top_k_enabled and not SamplingParams(top_k=0).top_k_enabled
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(presence_penalty=-0.5).has_penalties


def test_round_trips_through_dump():
    p = SamplingParams(n=3, temperature=0.7, stop=["a"], seed=123, logprobs=2)
    assert SamplingParams(**p.model_dump()) == p
