"""PrometheusObserver on its own: names, labels, counters from step deltas, histograms per request."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from vibee.runtime.outputs import RequestStats, StepStats
from vibee.server.metrics import PrometheusObserver


def _step(**kw) -> StepStats:
    base = dict(num_running=3, num_waiting=2, kv_cache_usage=0.25, num_preemptions=1, prefix_cache_queries=64,
                prefix_cache_hits=32, num_prompt_tokens=40, num_generation_tokens=3, batch_size=3, step_time=0.01)
    return StepStats(**{**base, **kw})


def test_step_and_request_metrics():
    reg = CollectorRegistry()
    obs = PrometheusObserver(reg, model_name="m")
    obs.on_step(_step())
    obs.on_step(_step(num_running=1, num_waiting=0, kv_cache_usage=0.5, num_preemptions=0, prefix_cache_queries=0,
                      prefix_cache_hits=0, num_prompt_tokens=0, num_generation_tokens=1))
    obs.on_request_finished(RequestStats("r1", "stop", 40, 4, 0.05, 0.2, 0.5, [0.1, 0.1, 0.1]))
    obs.on_request_finished(RequestStats("r2", "abort", 7, 0, 0.01, None, 0.02, []))
    v = lambda name, **labels: reg.get_sample_value(name, {"model_name": "m", **labels})  # noqa: E731
    assert v("vibee:num_requests_running") == 1 and v("vibee:num_requests_waiting") == 0
    assert v("vibee:kv_cache_usage_perc") == 0.5
    assert v("vibee:num_preemptions_total") == 1
    assert (v("vibee:prefix_cache_queries_total"), v("vibee:prefix_cache_hits_total")) == (64, 32)
    assert (v("vibee:prompt_tokens_total"), v("vibee:generation_tokens_total")) == (40, 4)
    assert v("vibee:request_success_total", finished_reason="stop") == 1
    assert v("vibee:request_success_total", finished_reason="abort") == 1
    assert v("vibee:time_to_first_token_seconds_count") == 1  # the aborted one never had a token
    assert v("vibee:inter_token_latency_seconds_count") == 3
    assert abs(v("vibee:inter_token_latency_seconds_sum") - 0.3) < 1e-9
    assert v("vibee:e2e_request_latency_seconds_count") == 2
    assert v("vibee:request_queue_time_seconds_sum") == 0.060000000000000005 or \
        abs(v("vibee:request_queue_time_seconds_sum") - 0.06) < 1e-9
    assert v("vibee:request_prompt_tokens_sum") == 47 and v("vibee:request_generation_tokens_sum") == 4
    assert v("vibee:request_prompt_tokens_bucket", le="50.0") == 2


def test_counters_ignore_negative_deltas_and_registries_are_separate():
    a, b = CollectorRegistry(), CollectorRegistry()
    PrometheusObserver(a).on_step(_step(num_generation_tokens=-1))
    PrometheusObserver(b)  # same names, other registry: no clash
    assert a.get_sample_value("vibee:generation_tokens_total", {"model_name": ""}) == 0
    text = generate_latest(b).decode()
    assert "# TYPE vibee:generation_tokens_total counter" in text


def test_kernel_compiles_while_serving_are_counted_from_the_observers_start():
    from types import SimpleNamespace

    from triton import knobs

    from vibee.runtime.jit_compiles import JitCompiles

    reg = CollectorRegistry()
    with JitCompiles() as compiles:
        knobs.runtime.jit_cache_hook(fn=SimpleNamespace(name="_before_serving"))  # a compile at load: not counted
        knobs.runtime.jit_post_compile_hook(fn=SimpleNamespace(name="_before_serving"))
        obs = PrometheusObserver(reg, model_name="m", compiles=compiles)
        obs.on_step(_step())
        assert reg.get_sample_value("vibee:kernel_compiles_total", {"model_name": "m"}) == 0
        for name in ("_a", "_b"):
            knobs.runtime.jit_cache_hook(fn=SimpleNamespace(name=name))
            knobs.runtime.jit_post_compile_hook(fn=SimpleNamespace(name=name))
        obs.on_step(_step())
        obs.on_step(_step())
    assert reg.get_sample_value("vibee:kernel_compiles_total", {"model_name": "m"}) == 2
    assert reg.get_sample_value("vibee:kernel_compile_seconds_total", {"model_name": "m"}) >= 0
    assert "# TYPE vibee:kernel_compiles_total counter" in generate_latest(PrometheusObserver(CollectorRegistry())
                                                                           .registry).decode()
