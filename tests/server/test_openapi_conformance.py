"""The server against its own /openapi.json (schemathesis, in process, on the fake engine): no
5xx, every status code documented, every body in its documented shape, malformed requests
refused. Not checked: that every schema-valid request is accepted, since some 400s follow rules a
schema can't state (a token id past this model's vocabulary, top_logprobs without logprobs,
exactly one of prompt and messages, a prompt that tokenizes to nothing)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import positive_data_acceptance  # noqa: E402

from vibee.server.app import create_app  # noqa: E402

from .fake_engine import FakeEngine  # noqa: E402

schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(FakeEngine()))


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
def test_api_keeps_to_its_schema(case):
    case.call_and_validate(excluded_checks=[positive_data_acceptance])


def test_the_key_and_size_limits_are_documented():
    doc = create_app(FakeEngine(), api_key="k").openapi()
    completions = doc["paths"]["/v1/completions"]["post"]["responses"]
    assert {"400", "401", "404", "413", "503"} <= set(completions)
    assert "401" not in doc["paths"]["/health"]["get"]["responses"]
    assert "401" not in create_app(FakeEngine()).openapi()["paths"]["/v1/completions"]["post"]["responses"]
    prompt = doc["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]
    assert all(option.get("minItems") == 1 for option in prompt["anyOf"] if option["type"] == "array")
