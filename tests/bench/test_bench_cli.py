"""`vibee bench serve` against a fake OpenAI streaming server, and `vibee bench throughput` end to end
when the engine and the default model are there."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi import FastAPI, Request  # module level: the routes' annotations are strings resolved here
from fastapi.responses import JSONResponse, StreamingResponse

from tests.server.harness import serve as running
from vibee.bench.cli import bench
from vibee.bench.report import random_workload
from vibee.bench.serve_load import arrival_gaps

VOCAB = 100
MAX_MODEL_LEN = 64
CHUNK_SLEEP = 0.002


def fake_openai_app(*, fail: bool = False, api_key: str | None = None, info: bool = True):
    """/v1/completions streaming one "x" per token. With fail=True, every 3rd request gets an HTTP 500
    and every 5th (not 3rd) an error event after its first chunk. Rejects prompts the benchmark
    should never send (ids outside 10..VOCAB-1, no ignore_eos, no usage asked)."""
    app = FastAPI()
    state = {"n": 0}

    def denied(request: Request):
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        return None

    @app.get("/v1/models")
    async def models(request: Request):
        return denied(request) or {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    if info:
        @app.get("/v1/inference/info")
        async def inference_info(request: Request):
            return denied(request) or {"model": {"name": "fake-model", "vocab_size": VOCAB, "max_model_len": MAX_MODEL_LEN,
                                                 "device": "fake", "dtype": "none"}}

    @app.post("/v1/completions")
    async def completions(request: Request):
        if (resp := denied(request)) is not None:
            return resp
        body = await request.json()
        state["n"] += 1
        k = state["n"]
        prompt, max_tokens = body["prompt"], body["max_tokens"]
        ok = (body.get("model") == "fake-model" and body.get("stream") is True and body.get("ignore_eos") is True
              and body.get("stream_options") == {"include_usage": True} and body.get("temperature") == 1.0
              and all(isinstance(t, int) and 10 <= t < VOCAB for t in prompt))
        if not ok:
            return JSONResponse({"error": {"message": f"unexpected request {body}"}}, status_code=400)
        if fail and k % 3 == 0:
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)

        def event(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        async def stream():
            for i in range(max_tokens):
                await asyncio.sleep(CHUNK_SLEEP)
                yield event({"id": "c", "object": "text_completion", "model": "fake-model",
                             "choices": [{"index": 0, "text": "x", "finish_reason": None}]})
                if fail and k % 5 == 0:
                    yield event({"error": {"message": "engine died", "type": "server_error"}})
                    return
            yield event({"id": "c", "choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
            yield event({"id": "c", "choices": [], "usage": {"prompt_tokens": len(prompt), "completion_tokens": max_tokens,
                                                             "total_tokens": len(prompt) + max_tokens}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def run_serve(url: str, tmp_path: Path, *extra: str):
    args = ["serve", "--base-url", url, "--num-prompts", "10", "--input-len", "4:8", "--output-len", "3:6",
            "--seed", "5", "--result-dir", str(tmp_path), *extra]
    result = CliRunner().invoke(bench, args)
    files = sorted(tmp_path.glob("serve-*.json"))
    data = json.loads(files[-1].read_text()) if files else None
    if data is not None:  # every written result has its latency plot beside it
        png = files[-1].with_suffix(".png")
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return result, data


def check_latency_fields(r, completed: int):
    for key in ("ttft_ms", "tpot_ms", "e2e_ms", "itl_ms"):
        s = r[key]
        assert set(s) == {"count", "mean", "median", "p90", "p99", "max"}
        if s["count"]:
            assert 0 < s["median"] <= s["p90"] <= s["p99"] <= s["max"]
    assert r["ttft_ms"]["count"] == r["e2e_ms"]["count"] == r["tpot_ms"]["count"] == completed
    # Every successful request streamed one chunk per token: tokens - 1 gaps each.
    assert r["itl_ms"]["count"] == r["total_output_tokens"] - completed
    assert r["ttft_ms"]["median"] >= CHUNK_SLEEP * 1000 * 0.9
    assert r["e2e_ms"]["mean"] > r["ttft_ms"]["mean"]


def test_serve_all_succeed(tmp_path):
    with running(fake_openai_app(api_key="sekrit")) as url:
        result, data = run_serve(url, tmp_path, "--max-concurrency", "4", "--api-key", "sekrit")
    assert result.exit_code == 0, result.output
    workload = random_workload(10, (4, 8), (3, 6), VOCAB, set(range(10)), 5)
    r = data["results"]
    assert (r["num_requests"], r["completed"], r["failed"], r["first_error"]) == (10, 10, 0, None)
    assert r["total_output_tokens"] == sum(workload.output_lens)
    assert r["total_input_tokens"] == sum(workload.input_lens)
    assert r["requests_without_usage"] == 0
    assert r["request_throughput"] == pytest.approx(10 / r["duration_s"])
    assert r["total_token_throughput"] == pytest.approx((r["total_input_tokens"] + r["total_output_tokens"]) / r["duration_s"])
    check_latency_fields(r, 10)
    s = data["settings"]
    assert s["model"] == "fake-model" and s["max_concurrency"] == 4 and s["request_rate"] == "inf"
    assert s["excluded_ids"].startswith("ids below 10")
    assert data["server_info"]["model"]["vocab_size"] == VOCAB
    assert {"torch", "cpu_count", "python"} <= set(data["environment"])
    md = next(tmp_path.glob("serve-*.md")).read_text()
    assert "| Successful requests | 10 |" in md and "| TTFT |" in md
    assert "TTFT" in result.stdout and "Output token throughput" in result.stdout


def test_serve_from_several_client_processes_sends_the_same_load(tmp_path):
    """--client-processes 3: every request once, from three processes that split the concurrency
    cap; the figures add up as from one process, and each process's share of a core is reported."""
    with running(fake_openai_app()) as url:
        result, data = run_serve(url, tmp_path, "--max-concurrency", "4", "--client-processes", "3")
    assert result.exit_code == 0, result.output
    workload = random_workload(10, (4, 8), (3, 6), VOCAB, set(range(10)), 5)
    r = data["results"]
    assert (r["num_requests"], r["completed"], r["failed"]) == (10, 10, 0)
    assert r["total_output_tokens"] == sum(workload.output_lens)
    assert r["total_input_tokens"] == sum(workload.input_lens)
    check_latency_fields(r, 10)
    assert len(r["client_cpu_share"]) == 3 and all(0 < b < 3 for b in r["client_cpu_share"])
    assert data["settings"]["client_processes"] == 3
    assert "from 3 client process(es)" in next(tmp_path.glob("serve-*.md")).read_text()


def test_client_processes_need_a_request_in_flight_each(tmp_path):
    with running(fake_openai_app()) as url:
        result, _ = run_serve(url, tmp_path, "--max-concurrency", "2", "--client-processes", "3")
    assert result.exit_code != 0 and "--max-concurrency 2 is below --client-processes 3" in result.output


def test_concurrency_shares_and_the_busy_client_note():
    from vibee.bench.serve_clients import busy_client_note, shares

    assert shares(10, 3) == [4, 3, 3] and shares(None, 2) == [None, None] and sum(shares(7, 7)) == 7
    assert busy_client_note([0.5, 0.3]) is None
    assert "--client-processes 4" in busy_client_note([0.95, 0.4])


def test_serve_counts_failures(tmp_path):
    with running(fake_openai_app(fail=True)) as url:
        result, data = run_serve(url, tmp_path, "--request-rate", "200")
    assert result.exit_code == 0, result.output
    r = data["results"]
    # 3, 6, 9 get HTTP 500; 5 and 10 fail mid-stream.
    assert (r["completed"], r["failed"]) == (5, 5)
    assert r["first_error"] in ("HTTP 500: boom", "error in stream: engine died")
    check_latency_fields(r, 5)
    assert data["settings"]["request_rate"] == 200.0
    # Poisson arrivals: the run lasts at least as long as the seeded gaps between sends.
    assert r["duration_s"] >= sum(arrival_gaps(10, 200.0, 5))
    assert "| Failed requests | 5 |" in next(tmp_path.glob("serve-*.md")).read_text()


def test_serve_all_failing_exits_1(tmp_path):
    with running(fake_openai_app()) as url:
        result, data = run_serve(url, tmp_path, "--model", "other-model")
    assert result.exit_code == 1
    assert data["results"]["failed"] == 10 and data["results"]["first_error"].startswith("HTTP 400")


def test_serve_needs_vocab_without_info(tmp_path):
    with running(fake_openai_app(info=False)) as url:
        result, _ = run_serve(url, tmp_path)
        assert result.exit_code == 2 and "--vocab-size" in result.output
        result, data = run_serve(url, tmp_path, "--vocab-size", str(VOCAB))
    assert result.exit_code == 0, result.output
    assert data["results"]["completed"] == 10


def test_serve_rejects_lengths_over_max_model_len(tmp_path):
    with running(fake_openai_app()) as url:
        result, _ = run_serve(url, tmp_path, "--output-len", str(MAX_MODEL_LEN))
    assert result.exit_code == 2 and "max_model_len" in result.output and "Traceback" not in result.output


def test_serve_unreachable_is_one_line(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    result, _ = run_serve(f"http://127.0.0.1:{port}", tmp_path)
    assert result.exit_code == 2
    assert "cannot reach" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("args", [["--input-len", "9:3"], ["--request-rate", "0"], ["--request-rate", "fast"]])
def test_bad_options_are_usage_errors(args):
    result = CliRunner().invoke(bench, ["serve", *args])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_throughput_bad_range_is_usage_error():
    result = CliRunner().invoke(bench, ["throughput", "--output-len", "x"])
    assert result.exit_code == 2 and "--output-len" in result.output


def _tiny_random_model(root: Path) -> Path:
    """A random 2-layer Llama + BPE tokenizer from the runtime tests' helpers (no trained model needed)."""
    import importlib.util

    pytest.importorskip("transformers")
    path = Path(__file__).resolve().parents[1] / "runtime" / "hf_models.py"
    spec = importlib.util.spec_from_file_location("bench_hf_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make_model(root / "tiny")
    return root / "tiny"


@pytest.mark.slow
@pytest.mark.parametrize("model,extra", [
    ("default", []),
    ("random", []),
    ("random", ["--no-kv-cache", "--no-flash-attn", "--max-num-seqs", "2"]),
    ("default", ["--structured-output", "text_regex"]),
    ("default", ["--structured-output", "json_object"]),
    ("default", ["--structured-output", "json_schema"]),
    ("default", ["--structured-output", "tool_call"]),
    ("default", ["--structured-output", "lark_expr"]),
    ("default", ["--structured-output", "lark_json"]),
])
def test_throughput_end_to_end(tmp_path, model, extra):
    pytest.importorskip("vibee.runtime.engine", reason="the engine's modules are not all there yet")
    from vibee.runtime.config import DEFAULT_MODEL_DIR

    if model == "default":
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            pytest.skip(f"no default model at {DEFAULT_MODEL_DIR}")
        model_args = []
    else:
        model_args = ["--model", str(_tiny_random_model(tmp_path))]
    out = tmp_path / "results"
    result = CliRunner().invoke(bench, ["throughput", *model_args, "--num-prompts", "4", "--input-len", "8:16",
                                        "--output-len", "8:16", "--device", "cpu", "--seed", "1",
                                        "--result-dir", str(out), *extra])
    assert result.exit_code == 0, result.output
    data = json.loads(next(out.glob("throughput-*.json")).read_text())
    r = data["results"]
    assert r["num_requests"] == r["finished_requests"] == 4
    # Lengths don't depend on which ids may be drawn (choices() takes one draw per token either way).
    assert r["output_tokens"] == sum(random_workload(4, (8, 16), (8, 16), 100, (), 1).output_lens)
    assert r["elapsed_s"] > 0 and r["output_tokens_per_s"] > 0 and r["requests_per_s"] > 0
    assert r["total_tokens_per_s"] > r["output_tokens_per_s"]
    max_seqs = 2 if "--max-num-seqs" in extra else 4
    assert 1 <= r["mean_batch_size"] <= max_seqs and r["max_running"] <= max_seqs and r["preemptions"] >= 0
    s = data["settings"]
    assert s["device"] == "cpu" and s["dtype"] == "float32" and s["kv_cache"] == ("--no-kv-cache" not in extra)
    assert data["warmup"]["requests"] == 1
    # A constrained run warms up under the same grammar (its DFA and mask kernels built untimed).
    assert sum(data["warmup"]["constrained"].values()) == ("--structured-output" in extra)
    md = next(out.glob("throughput-*.md")).read_text()
    assert "Output tokens/s" in md and "Triton compiles inside the timed loop" in md
    assert ("too short" in md) == (r["elapsed_s"] < 1.0)  # a 4-prompt CPU run: said to be too short to compare
    assert set(r["jit_compiles"]) == {"count", "seconds", "kernels"}
    assert "warm-up" in result.output
    masks = r["grammar_masks"]
    if "--structured-output" in extra:  # every output token was sampled under one row's mask
        assert masks["rows"] == r["output_tokens"] and 1 <= masks["steps"] <= r["steps"]
        assert masks["ms_per_step"] > 0 and "Grammar masks" in result.output
        # All on the device: JSON mode and lark_json as automata with a stack, the others as token DFAs.
        assert (masks["host_requests"], masks["device_requests"]) == (0, 4)
    else:
        assert masks is None


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_throughput_compares_preemption_by_swap_and_recompute(tmp_path, mode):
    """A KV cache too small for the load forces preemptions; the report counts them and, with
    --preemption-mode swap, the blocks copied out and back."""
    model_args = ["--model", str(_tiny_random_model(tmp_path))]
    out = tmp_path / "results"
    result = CliRunner().invoke(bench, ["throughput", *model_args, "--num-prompts", "6", "--input-len", "12",
                                        "--output-len", "40", "--device", "cpu", "--seed", "1", "--block-size", "16",
                                        "--num-kv-blocks", "10", "--preemption-mode", mode, "--swap-space", "0.01",
                                        "--result-dir", str(out)])
    assert result.exit_code == 0, result.output
    r = json.loads(next(out.glob("throughput-*.json")).read_text())["results"]
    assert r["finished_requests"] == 6 and r["output_tokens"] == 6 * 40
    assert r["preemptions"] > 0 and r["preemption_mode"] == mode
    if mode == "swap":
        assert r["swap_outs"] > 0 and r["swap_ins"] == r["swap_outs"] and r["swap_fallbacks"] == 0
        assert "Swap-outs / swap-ins" in result.output
    else:
        assert r["swap_outs"] == r["swap_ins"] == 0


@pytest.mark.slow
def test_throughput_repeats_the_load_with_nothing_for_the_prefix_cache(tmp_path):
    """--repeat 3 times the requests three times in one engine; with prefix caching on, no pass
    reuses an earlier one's blocks (each moves the prompts' first tokens), and the report is the
    median pass."""
    model_args = ["--model", str(_tiny_random_model(tmp_path))]
    out = tmp_path / "results"
    result = CliRunner().invoke(bench, ["throughput", *model_args, "--num-prompts", "3", "--input-len", "40",
                                        "--output-len", "4", "--device", "cpu", "--seed", "1", "--block-size", "8",
                                        "--enable-prefix-caching", "--repeat", "3", "--result-dir", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(next(out.glob("throughput-*.json")).read_text())
    r = data["results"]
    assert data["settings"]["repeat"] == 3 and data["settings"]["enable_prefix_caching"]
    assert len(r["passes"]) == 3 and [p["prefix_cache_hit_tokens"] for p in r["passes"]] == [0, 0, 0]
    rates = sorted(p["output_tokens_per_s"] for p in r["passes"])
    assert r["output_tokens_per_s"] == rates[1] and r["output_tokens"] == 3 * 4
    assert "each of 3 passes" in result.output
