"""Raw-HTTP behaviour: error shapes for malformed bodies, SSE framing, /health, /metrics,
/tokenize, /detokenize, the inference info/stats endpoints, and API-key scope."""

from __future__ import annotations

import json

import httpx
import pytest

from .fake_engine import FakeEngine, expected_text

MODEL = "fake-model"


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "\n" not in body["error"]["message"] and "Traceback" not in body["error"]["message"]
    return body["error"]


def test_malformed_json(srv):
    headers = {"Content-Type": "application/json"}
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        err = _error(httpx.post(srv.url + path, content=b'{"prompt": "hi",', headers=headers), 400)
        assert err["type"] == "invalid_request_error" and "JSON" in err["message"] and err["param"] is None
    err = _error(httpx.post(srv.url + "/v1/completions", content=b"[1, 2]", headers=headers), 400)
    assert "JSON object" in err["message"]
    err = _error(httpx.post(srv.url + "/v1/completions", content=b"", headers=headers), 400)
    assert "missing" in err["message"]
    err = _error(httpx.post(srv.url + "/v1/completions", content=b'{"prompt": "hi"}'), 400)
    assert "Content-Type: application/json" in err["message"]


def test_wrong_types_name_the_field(srv):
    cases = [
        ({"prompt": 5}, "prompt"),
        ({"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 2.5}, "max_tokens"),
        ({"prompt": "hi", "stream": "yes"}, "stream"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"prompt": "hi", "stop": 3}, "stop"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "stream_options": {"include_usage": "y"}, "stream": True}, "stream_options.include_usage"),
        ({"max_tokens": 3}, "prompt"),
    ]
    for body, param in cases:
        err = _error(httpx.post(srv.url + "/v1/completions", json=body), 400)
        assert err["param"] == param, (body, err)
    err = _error(httpx.post(srv.url + "/v1/chat/completions",
                            json={"messages": [{"role": "user", "content": "hi"}], "logprobs": 1}), 400)
    assert err["param"] == "logprobs"
    err = _error(httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"content": "hi"}]}), 400)
    assert err["param"] == "messages[0].role" and "Missing" in err["message"]


def test_extra_fields_ignored_and_model_optional(srv):
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "metadata": {"x": 1},
                                                      "unknown": [1, 2]})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected_text(2)


def test_unknown_paths_and_methods(srv):
    err = _error(httpx.get(srv.url + "/v1/nope"), 404)
    assert "/v1/nope" in err["message"]
    _error(httpx.get(srv.url + "/v1/completions"), 405)


def test_sse_framing(srv):
    with httpx.stream("POST", srv.url + "/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(p["choices"][0]["delta"]["content"] for p in payloads) == expected_text(3)
    assert all("usage" not in p for p in payloads)
    assert len({p["id"] for p in payloads}) == 1


def test_stream_error_in_band(make_server):
    s = make_server(FakeEngine(fail_after=1))
    with httpx.stream("POST", s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 5, "stream": True}) as r:
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    err = json.loads(events[-2].removeprefix("data: "))["error"]
    assert err["type"] == "server_error" and "fake engine failure" in err["message"]


def test_health(srv):
    ok = httpx.get(srv.url + "/health")
    assert ok.status_code == 200 and ok.json() == {"status": "ok"}
    srv.engine.alive = False
    _error(httpx.get(srv.url + "/health"), 503)


def test_metrics_after_requests(srv):
    httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4})
    httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 20, "stop": "quick"})
    r = httpx.get(srv.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    label = 'model_name="fake-model"'
    assert f'vibee:request_success_total{{finished_reason="length",{label}}} 1.0' in text
    assert f'vibee:request_success_total{{finished_reason="stop",{label}}} 1.0' in text
    assert f"vibee:prompt_tokens_total{{{label}}} 6.0" in text
    assert f"vibee:generation_tokens_total{{{label}}} {4 + len('the quick'):.1f}" in text
    assert f"vibee:time_to_first_token_seconds_count{{{label}}} 2.0" in text
    assert f"vibee:request_generation_tokens_sum{{{label}}} {4 + len('the quick'):.1f}" in text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "num_preemptions_total", "inter_token_latency_seconds_bucket",
                 "e2e_request_latency_seconds_bucket", "request_queue_time_seconds_bucket",
                 "request_prompt_tokens_bucket"):
        assert f"vibee:{name}" in text, name


def test_two_apps_have_separate_registries(make_server):
    a, b = make_server(), make_server()
    httpx.post(a.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert 'vibee:request_success_total{finished_reason="length"' in httpx.get(a.url + "/metrics").text
    assert "vibee:request_success_total{" not in httpx.get(b.url + "/metrics").text


def test_tokenize_detokenize(srv):
    r = httpx.post(srv.url + "/tokenize", json={"prompt": "hi"})
    assert r.json() == {"tokens": [1, 104, 105], "count": 3, "max_model_len": 256}
    r = httpx.post(srv.url + "/tokenize", json={"prompt": "hi", "add_special_tokens": False, "model": MODEL})
    assert r.json()["tokens"] == [104, 105]
    r = httpx.post(srv.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.json()["count"] == len("[user] hi\n[assistant] ")
    assert httpx.post(srv.url + "/detokenize", json={"tokens": [1, 104, 105]}).json() == {"prompt": "hi"}
    assert _error(httpx.post(srv.url + "/detokenize", json={"tokens": [104, 999]}), 400)["param"] == "tokens"
    assert _error(httpx.post(srv.url + "/detokenize", json={"tokens": "hi"}), 400)["param"] == "tokens"
    _error(httpx.post(srv.url + "/tokenize", json={}), 400)
    _error(httpx.post(srv.url + "/tokenize", json={"prompt": "a", "messages": []}), 400)
    assert _error(httpx.post(srv.url + "/tokenize", json={"prompt": "a", "model": "x"}), 404)["code"] == \
        "model_not_found"


def test_inference_info_and_stats(srv):
    assert httpx.get(srv.url + "/v1/inference/info").json()["engine"] == "fake"
    httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
    assert httpx.get(srv.url + "/v1/inference/stats").json()["finished"] == 1


def test_api_key_scope(make_server):
    s = make_server(api_key="k1")
    good = {"Authorization": "Bearer k1"}
    assert httpx.get(s.url + "/health").status_code == 200
    assert httpx.get(s.url + "/metrics").status_code == 200
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/tokenize"),
                         ("POST", "/detokenize"), ("GET", "/v1/inference/info"), ("GET", "/v1/inference/stats")):
        err = _error(httpx.request(method, s.url + path, json={}), 401)
        assert err["code"] == "invalid_api_key" and "Bearer" in err["message"]
        _error(httpx.request(method, s.url + path, json={}, headers={"Authorization": "Bearer k2"}), 401)
    # A bad key wins over a bad body.
    _error(httpx.post(s.url + "/v1/completions", content=b"{", headers={"Content-Type": "application/json"}), 401)
    assert httpx.get(s.url + "/v1/models", headers=good).status_code == 200
    assert httpx.post(s.url + "/tokenize", json={"prompt": "a"}, headers=good).status_code == 200


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "a\ud800b", "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "x\udfff"], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": "ok", "stop": ["\ud83d"], "max_tokens": 2}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages[0].content"),
    ("/tokenize", {"prompt": "\udc00"}, "prompt"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(srv, path, body, param):
    """JSON can spell a lone UTF-16 surrogate (\\ud800); it is not text any tokenizer takes."""
    r = httpx.post(srv.url + path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "lone UTF-16 surrogate" in err["message"], err
    ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "a\U0001F600b", "max_tokens": 2})  # a real pair
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("n", [1_000_000, 17])
def test_n_has_one_limit(srv, n):
    """The protocol checks n against the engine's own limit, so every n past it gets the same message."""
    from vibee.runtime.sampling_params import MAX_N

    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1, "n": n})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
    assert f"less than or equal to {MAX_N}" in r.json()["error"]["message"], r.text


def test_openapi_documents_what_is_sent(srv):
    doc = httpx.get(srv.url + "/openapi.json").json()
    ops = [op for path in doc["paths"].values() for op in path.values()]
    assert not [op for op in ops if "422" in op.get("responses", {})]
    completions = doc["paths"]["/v1/completions"]["post"]["responses"]["400"]
    assert completions["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(doc["paths"]["/health"]["get"]["responses"]) == {"200", "503"}
    bad = httpx.post(srv.url + "/v1/completions", json={"prompt": 5})  # and a bad request is the documented 400
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("message, param, words", [
    ({"role": "tool"}, "messages[0].content", "tool message needs its content"),
    ({"role": "tool", "content": "42"}, "messages[0].tool_call_id", "tool_call_id"),
    ({"role": "user"}, "messages[0].content", "user message needs its content"),
])
def test_chat_messages_without_what_their_role_needs_are_400s(srv, message, param, words):
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [message]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and words in r.json()["error"]["message"], r.text
