"""Prometheus metrics, named like vLLM's with a `vibee:` prefix so its dashboards carry over.

`PrometheusObserver(registry)` is an engine observer: the engine calls `on_step(StepStats)` after
every step and `on_request_finished(RequestStats)` when a request's last choice finishes (both
from the engine's thread; prometheus_client is thread-safe). Each app gets its own registry, so
tests can build several apps in one process.

Notes on names:
- Counters are declared without `_total`; prometheus_client appends it on exposition.
- `vibee:kv_cache_usage_perc` is a 0..1 fraction, as vLLM's metric of that name is.
- Decode latency is `vibee:inter_token_latency_seconds` (vLLM's newer name; its older
  `time_per_output_token_seconds` measures the same gaps and is not exported twice): one gap per
  engine step that gave a request tokens, as vLLM v1 counts it. A step that emits several tokens
  of one request (verified drafts, a multi-step) is one gap, not one and then zeros.
- prompt/generation token counters advance per step (so they move while long requests run);
  the request_* histograms are per finished request.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "vibee:"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_REQUEST_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                            40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class PrometheusObserver:
    """compiles: Triton's compiles in this process (runtime/jit_compiles.py), exported as
    `vibee:kernel_compiles` and `vibee:kernel_compile_seconds` from the observer's creation on; a
    compile while serving stalls every running request (none: the engine compiled its kernels at
    load and warm-up)."""

    def __init__(self, registry: CollectorRegistry, *, model_name: str = "", compiles=None):
        self.registry = registry
        self.model_name = model_name
        self.compiles = compiles
        self._compiles_seen = (compiles.count, compiles.seconds) if compiles is not None else (0, 0.0)
        labels = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=registry)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, labels + list(extra), registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=registry)

        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "Fraction (0..1) of KV cache blocks in use.")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.num_preemptions = counter("num_preemptions", "Requests preempted (to be recomputed).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens computed (recomputation included).")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.request_success = counter("request_success", "Finished requests, by finish reason.",
                                       ("finished_reason",))
        self.time_to_first_token = histogram("time_to_first_token_seconds",
                                             "Seconds from arrival to the first generated token.", _TTFT_BUCKETS)
        self.inter_token_latency = histogram("inter_token_latency_seconds",
                                             "Seconds between the engine steps that gave a request its tokens.",
                                             _ITL_BUCKETS)
        self.e2e_request_latency = histogram("e2e_request_latency_seconds",
                                             "Seconds from arrival to the request's last token.",
                                             _REQUEST_SECONDS_BUCKETS)
        self.request_queue_time = histogram("request_queue_time_seconds",
                                            "Seconds from arrival to first being scheduled.",
                                            _REQUEST_SECONDS_BUCKETS)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt length of finished requests.",
                                               _TOKEN_BUCKETS)
        self.request_generation_tokens = histogram("request_generation_tokens",
                                                   "Tokens generated by finished requests (all choices).",
                                                   _TOKEN_BUCKETS)
        self.kernel_compiles = counter("kernel_compiles", "Triton kernels compiled while serving (each stalls every "
                                                          "running request for its compile).")
        self.kernel_compile_seconds = counter("kernel_compile_seconds", "Seconds spent compiling Triton kernels while serving.")
        # Touch every unlabelled-by-reason series so a fresh server exports zeros, not nothing.
        for metric in (self.kernel_compiles, self.kernel_compile_seconds, self.num_requests_running, self.num_requests_waiting, self.kv_cache_usage_perc,
                       self.prefix_cache_queries, self.prefix_cache_hits, self.num_preemptions, self.prompt_tokens,
                       self.generation_tokens, self.time_to_first_token, self.inter_token_latency,
                       self.e2e_request_latency, self.request_queue_time, self.request_prompt_tokens,
                       self.request_generation_tokens):
            metric.labels(model_name)

    def on_step(self, stats) -> None:
        m = self.model_name
        self.num_requests_running.labels(m).set(stats.num_running)
        self.num_requests_waiting.labels(m).set(stats.num_waiting)
        self.kv_cache_usage_perc.labels(m).set(stats.kv_cache_usage)
        # Counters only go up; a negative delta would be an engine bug, not worth crashing the step for.
        for metric, value in ((self.prefix_cache_queries, stats.prefix_cache_queries),
                              (self.prefix_cache_hits, stats.prefix_cache_hits),
                              (self.num_preemptions, stats.num_preemptions),
                              (self.prompt_tokens, stats.num_prompt_tokens),
                              (self.generation_tokens, stats.num_generation_tokens)):
            if value > 0:
                metric.labels(m).inc(value)
        if self.compiles is not None and self.compiles.count != self._compiles_seen[0]:
            count, seconds = self.compiles.count, self.compiles.seconds
            self.kernel_compiles.labels(m).inc(count - self._compiles_seen[0])
            self.kernel_compile_seconds.labels(m).inc(max(0.0, seconds - self._compiles_seen[1]))
            self._compiles_seen = (count, seconds)

    def on_request_finished(self, stats) -> None:
        m = self.model_name
        self.request_success.labels(m, stats.finish_reason).inc()
        if stats.time_to_first_token is not None:
            self.time_to_first_token.labels(m).observe(stats.time_to_first_token)
        itl = self.inter_token_latency.labels(m)
        for gap in stats.inter_token_latencies:
            itl.observe(gap)
        self.e2e_request_latency.labels(m).observe(stats.e2e_latency)
        self.request_queue_time.labels(m).observe(stats.queue_time)
        self.request_prompt_tokens.labels(m).observe(stats.num_prompt_tokens)
        self.request_generation_tokens.labels(m).observe(stats.num_generation_tokens)
