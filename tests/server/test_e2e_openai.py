"""End to end: the real AsyncEngine with the default model (models/vibee-tiny) behind the HTTP
server, driven by the official openai client. Skipped when the engine isn't there; until the
default model is built, a tiny random model from tests/runtime/hf_models.py stands in."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
from types import SimpleNamespace

import httpx
import pytest

from .harness import serve, wait_until

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Tell me a story about a fox."}]


@pytest.fixture(scope="module")
def engine_config(tmp_path_factory):
    """The EngineConfig the e2e engines are built from (CPU, a small KV cache)."""
    pytest.importorskip("vibee.runtime.async_engine")
    config_mod = pytest.importorskip("vibee.runtime.config")
    model_dir = None  # the default model
    if not (config_mod.DEFAULT_MODEL_DIR / "config.json").exists():
        hf_models = pytest.importorskip("runtime.hf_models", reason="no default model and no tiny-model helper")
        model_dir = tmp_path_factory.mktemp("tiny-model") / "tiny"
        hf_models.make_model(model_dir)
    return config_mod.EngineConfig(model=model_dir, device="cpu", cpu_kv_cache_gib=0.25, seed=0)


@contextlib.contextmanager
def _served_engine(config):
    import openai

    from vibee.runtime.async_engine import AsyncEngine
    from vibee.server.app import create_app

    engine = AsyncEngine.from_config(config, progress=False)
    try:
        app = create_app(engine)
        with serve(app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
            try:
                yield SimpleNamespace(engine=engine, app=app, url=url, client=client, model=engine.served_model_name)
            finally:
                client.close()
    finally:
        asyncio.run(engine.shutdown(timeout=0.0))


@pytest.fixture(scope="module")
def real_engine_app(engine_config):
    """SimpleNamespace(engine, app, url, client, model): one engine for the whole module."""
    with _served_engine(engine_config) as served:
        yield served


def test_models_and_health(real_engine_app):
    s = real_engine_app
    assert [m.id for m in s.client.models.list().data] == [s.model]
    assert httpx.get(s.url + "/health").status_code == 200
    info = httpx.get(s.url + "/v1/inference/info").json()
    assert info["model"]["name"] == s.model
    assert "requests" in httpx.get(s.url + "/v1/inference/stats").json()


def test_batch_prompts_with_n(real_engine_app):
    s = real_engine_app
    r = s.client.completions.create(model=s.model, prompt=["Once", "Twice upon"], n=2, max_tokens=5, temperature=0.8,
                                    seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    single = s.client.completions.create(model=s.model, prompt="Twice upon", n=2, max_tokens=5, temperature=0.8,
                                         seed=3)
    # A seeded choice doesn't depend on what else is in the batch.
    assert [c.text for c in r.choices[2:]] == [c.text for c in single.choices]


def test_greedy_completion_is_deterministic_and_counts_tokens(real_engine_app):
    s = real_engine_app
    a = s.client.completions.create(model=s.model, prompt="Once upon a time", max_tokens=12, temperature=0)
    b = s.client.completions.create(model=s.model, prompt="Once upon a time", max_tokens=12, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    tok = httpx.post(s.url + "/tokenize", json={"prompt": "Once upon a time"}).json()
    assert a.usage.prompt_tokens == tok["count"]
    assert 1 <= a.usage.completion_tokens <= 12
    assert a.choices[0].finish_reason in ("stop", "length")


def test_stream_matches_non_stream(real_engine_app):
    s = real_engine_app
    whole = s.client.chat.completions.create(model=s.model, messages=CHAT, max_tokens=16, temperature=0)
    chunks = list(s.client.chat.completions.create(model=s.model, messages=CHAT, max_tokens=16, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.delta.content or "" for ch in chunks for c in ch.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_seeded_n_is_reproducible(real_engine_app):
    s = real_engine_app

    def run():
        r = s.client.completions.create(model=s.model, prompt="The fox", max_tokens=8, n=3, temperature=1.0, seed=7)
        return [c.text for c in r.choices]

    first = run()
    assert len(first) == 3 and run() == first


def test_stop_string_cuts_output(real_engine_app):
    s = real_engine_app
    base = s.client.completions.create(model=s.model, prompt="Once upon a time", max_tokens=24, temperature=0)
    text = base.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if len(stop) < 2 or not stop.strip():
        pytest.skip("the greedy output is too short or blank to pick a stop string")
    r = s.client.completions.create(model=s.model, prompt="Once upon a time", max_tokens=24, temperature=0, stop=stop)
    assert r.choices[0].text == text[:text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_greedy_logprobs_pick_the_top_token(real_engine_app):
    s = real_engine_app
    r = s.client.chat.completions.create(model=s.model, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert math.isclose(t.logprob, t.top_logprobs[0].logprob, rel_tol=1e-4, abs_tol=1e-4)


def test_errors(real_engine_app):
    import openai

    s = real_engine_app
    with pytest.raises(openai.BadRequestError) as info:
        s.client.completions.create(model=s.model, prompt="hi", max_tokens=10**7)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        s.client.completions.create(model="nope", prompt="hi")


def test_disconnect_frees_kv_blocks(real_engine_app):
    s = real_engine_app
    before = _stats(s)["requests"]["aborted"]
    body = {"model": s.model, "messages": CHAT, "max_tokens": 200, "temperature": 1.0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    assert wait_until(lambda: _stats(s)["requests"]["aborted"] == before + 1, timeout=10)
    assert wait_until(lambda: _stats(s)["requests"]["running"] == 0, timeout=10)
    assert _stats(s)["kv_cache"]["used_blocks"] == 0
    metrics = httpx.get(s.url + "/metrics").text
    assert 'vibee:request_success_total{finished_reason="abort"' in metrics

    def gauges_idle() -> bool:  # no step follows the abort: the engine reports the gauges with it
        lines = httpx.get(s.url + "/metrics").text.splitlines()
        values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in lines
                  if line.startswith(("vibee:num_requests_running", "vibee:kv_cache_usage_perc"))}
        return values == {"vibee:num_requests_running": 0.0, "vibee:kv_cache_usage_perc": 0.0}

    assert wait_until(gauges_idle, timeout=10), httpx.get(s.url + "/metrics").text


def test_concurrent_requests_are_batched(real_engine_app):
    s = real_engine_app
    steps_before = _stats(s)["batching"]["steps"]
    results: dict[int, object] = {}
    barrier = threading.Barrier(4)

    def one(i: int) -> None:
        barrier.wait(30)
        results[i] = s.client.completions.create(model=s.model, prompt=f"Request number {i}", max_tokens=48,
                                                 temperature=0, extra_body={"ignore_eos": True})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 1, 2, 3]
    assert all(r.usage.completion_tokens == 48 and r.choices[0].finish_reason == "length" for r in results.values())
    # 4 x 48 tokens took fewer steps than running them one after another would.
    assert _stats(s)["batching"]["steps"] - steps_before < 4 * 48


def test_shutdown_refuses_new_requests(engine_config):
    import openai

    with _served_engine(engine_config) as s:
        asyncio.run(s.engine.shutdown(timeout=1.0))
        assert httpx.get(s.url + "/health").status_code == 503
        with pytest.raises(openai.InternalServerError) as info:
            s.client.completions.create(model=s.model, prompt="hi", max_tokens=2)
        assert info.value.status_code == 503


def _stats(s) -> dict:
    """The engine's live figures, as a client reads them (the engine runs in its own process)."""
    return httpx.get(s.url + "/v1/inference/stats").json()


def _metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def test_32_concurrent_streams_finish_and_free_everything(real_engine_app):
    """32 streaming clients at once: every stream gets exactly its max_tokens, then every KV block
    is free and the Prometheus counters add up to what the clients saw."""
    import openai

    s = real_engine_app
    before = httpx.get(s.url + "/metrics").text
    lengths = [8 + (i * 7) % 17 for i in range(32)]

    async def one(client, i: int) -> tuple[int, int, int, str]:
        stream = await client.completions.create(
            model=s.model, prompt=f"def function_{i}(x):", max_tokens=lengths[i], temperature=0.8, seed=i,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
        return usage.completion_tokens, usage.prompt_tokens, i, finish

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(all_of_them())
    assert [r[0] for r in sorted(results, key=lambda r: r[2])] == lengths
    assert all(r[3] == "length" for r in results)
    assert wait_until(lambda: _stats(s)["requests"]["running"] == 0, timeout=10)
    stats = _stats(s)
    assert stats["kv_cache"]["used_blocks"] == 0 and stats["requests"]["waiting"] == 0
    assert stats["batching"]["avg_batch_size"] > 1
    after = httpx.get(s.url + "/metrics").text

    def delta(name, **labels):
        return _metric(after, name, **labels) - _metric(before, name, **labels)

    assert delta("vibee:generation_tokens_total") == sum(lengths)
    assert delta("vibee:request_success_total", finished_reason="length") == 32
    assert delta("vibee:time_to_first_token_seconds_count") == 32
    assert delta("vibee:e2e_request_latency_seconds_count") == 32
    assert delta("vibee:inter_token_latency_seconds_count") == sum(lengths) - 32
    assert delta("vibee:prompt_tokens_total") == sum(r[1] for r in results)
    assert _metric(after, "vibee:num_requests_running") == 0
    assert _metric(after, "vibee:kv_cache_usage_perc") == 0


def _hf_logprobs(model_dir, ids: list[int]) -> list[float]:
    """transformers' logprob of each token after the first, given the ones before it."""
    import torch
    from transformers import AutoModelForCausalLM

    from vibee.runtime.config import DEFAULT_MODEL_DIR

    model = AutoModelForCausalLM.from_pretrained(model_dir or DEFAULT_MODEL_DIR, dtype=torch.float32)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def test_loglikelihood_requests_as_lm_evaluation_harness_sends_them(real_engine_app, engine_config):
    """lm-eval's local-completions loglikelihood: token-id prompts, echo, logprobs 1, max_tokens 1;
    it sums token_logprobs[ctxlen:-1] and calls the continuation greedy when each is its top's best."""
    tok = real_engine_app.engine.tokenizer
    context, continuation = tok.encode("def add(a, b):\n"), tok.encode("    return a + b\n", add_special_tokens=False)
    ids = context + continuation
    body = {"model": real_engine_app.model, "prompt": [ids, ids[:5]], "max_tokens": 1, "temperature": 0,
            "logprobs": 1, "echo": True, "seed": 1234}
    r = httpx.post(real_engine_app.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choice = sorted(r.json()["choices"], key=lambda c: c["index"])[0]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    expected = _hf_logprobs(engine_config.model, ids)
    assert lp["token_logprobs"][1:-1] == pytest.approx(expected, abs=1e-4)
    got = lp["token_logprobs"][len(context):-1]
    assert sum(got) == pytest.approx(sum(expected[len(context) - 1:]), abs=1e-3)
    for token_logprob, top in zip(got, lp["top_logprobs"][len(context):-1]):  # lm-eval's is_greedy needs both
        assert token_logprob <= max(top.values()) + 1e-6 and len(top) <= 2
    # max_tokens 0: the prompt alone, scored; nothing generated, nothing counted as completion
    body.update(max_tokens=0, prompt=ids)
    only = httpx.post(real_engine_app.url + "/v1/completions", json=body, timeout=120).json()
    lp0 = only["choices"][0]["logprobs"]
    assert lp0["token_logprobs"][1:] == pytest.approx(lp["token_logprobs"][1:-1], abs=1e-5)
    assert only["usage"]["completion_tokens"] == 0 and only["choices"][0]["finish_reason"] == "length"
    assert only["choices"][0]["text"] == tok.decode(ids)


def test_echo_text_offsets_index_the_echoed_text(real_engine_app):
    """A string prompt gets BOS, which the echoed text leaves out: offsets still index that text."""
    body = {"model": real_engine_app.model, "prompt": "import os\nimport sys\n", "max_tokens": 4, "temperature": 0,
            "logprobs": 0, "echo": True}
    for stream in (False, True):
        if stream:
            with httpx.stream("POST", real_engine_app.url + "/v1/completions", json={**body, "stream": True},
                              timeout=120) as r:
                chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
            offsets = [o for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                       for o in c["choices"][0]["logprobs"]["text_offset"]]
            tokens = [t for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                      for t in c["choices"][0]["logprobs"]["tokens"]]
        else:
            choice = httpx.post(real_engine_app.url + "/v1/completions", json=body, timeout=120).json()["choices"][0]
            text, offsets, tokens = choice["text"], choice["logprobs"]["text_offset"], choice["logprobs"]["tokens"]
        assert text.startswith("import os") and offsets[0] == 0 and len(offsets) == len(tokens)
        tokenizer = real_engine_app.engine.tokenizer
        special = {tokenizer.decode([i], skip_special_tokens=False) for i in tokenizer.all_special_ids}
        assert tokens[0] in special  # BOS: listed, but not in the text
        for token, at in zip(tokens, offsets):
            if token not in special:
                assert text[at: at + len(token)] == token, (stream, token, at)


def test_vllm_prompt_logprobs_field(real_engine_app, engine_config):
    """vLLM's prompt_logprobs: per prompt position, the prompt token (with its rank) and the k
    likeliest, keyed by token id; None first; in the body, and in a stream's first chunk."""
    tok = real_engine_app.engine.tokenizer
    ids = tok.encode("def add(a, b):\n    return a + b\n")
    body = {"model": real_engine_app.model, "prompt": ids, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 2}
    choice = httpx.post(real_engine_app.url + "/v1/completions", json=body, timeout=120).json()["choices"][0]
    scored = choice["prompt_logprobs"]
    assert len(scored) == len(ids) and scored[0] is None
    expected = _hf_logprobs(engine_config.model, ids)
    for i, position in enumerate(scored[1:]):
        mine = position[str(ids[i + 1])]
        assert mine["logprob"] == pytest.approx(expected[i], abs=1e-4)
        assert mine["decoded_token"] == tok.decode([ids[i + 1]], skip_special_tokens=False)
        ranked = sorted(position.values(), key=lambda v: v["rank"])
        assert [v["rank"] for v in ranked][:2] == [1, 2] and ranked[0]["logprob"] >= ranked[1]["logprob"]
        # The prompt token's rank: 1 + the alternatives likelier than it.
        assert mine["rank"] == 1 + sum(v["logprob"] > mine["logprob"] for v in ranked[:2]) or mine["rank"] > 2
    unasked = httpx.post(real_engine_app.url + "/v1/completions", json={**body, "prompt_logprobs": None},
                         timeout=120).json()["choices"][0]
    assert unasked.get("prompt_logprobs") is None
    with httpx.stream("POST", real_engine_app.url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    firsts = [c["choices"][0] for c in chunks if c["choices"] and "prompt_logprobs" in c["choices"][0]]
    assert len(firsts) == 1 and firsts[0]["prompt_logprobs"] == scored


def test_chat_prompt_logprobs_score_the_templated_prompt(real_engine_app, engine_config):
    """vLLM's prompt_logprobs on chat: the response's prompt_logprobs score the prompt the chat
    template made (its token ids from /tokenize), as transformers does; streamed, a 400."""
    messages = [{"role": "user", "content": "def add(a, b):"}]
    ids = httpx.post(real_engine_app.url + "/tokenize", json={"model": real_engine_app.model, "messages": messages},
                     timeout=60).json()["tokens"]
    body = {"model": real_engine_app.model, "messages": messages, "max_tokens": 2, "temperature": 0,
            "prompt_logprobs": 1}
    reply = httpx.post(real_engine_app.url + "/v1/chat/completions", json=body, timeout=120).json()
    scored = reply["prompt_logprobs"]
    assert len(scored) == len(ids) == reply["usage"]["prompt_tokens"] and scored[0] is None
    expected = _hf_logprobs(engine_config.model, ids)
    for i, position in enumerate(scored[1:]):
        assert position[str(ids[i + 1])]["logprob"] == pytest.approx(expected[i], abs=1e-4)
    plain = httpx.post(real_engine_app.url + "/v1/chat/completions", json={**body, "prompt_logprobs": None},
                       timeout=120).json()
    assert plain.get("prompt_logprobs") is None
    streamed = httpx.post(real_engine_app.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60)
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "prompt_logprobs"
