"""`vibee serve --tensor-parallel-size 2` on the CPU as a user runs it, launched by vibee and by
torchrun: the tp = 1 greedy completions for concurrent requests, /v1/inference/info naming the
ranks, a clean stop on SIGTERM, and a dead worker ending the server with the reason."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.server.test_cli_serve import _start_serving, _stopped, model_dir  # noqa: F401 - the fixture
from vibee.runtime.config import EngineConfig
from vibee.runtime.engine import LLMEngine
from vibee.runtime.sampling_params import SamplingParams

pytestmark = pytest.mark.slow
PROMPTS = ["hello", "the quick brown", "one two three four", "a"]


def _tp1_texts(model_dir) -> list[str]:
    eng = LLMEngine(EngineConfig(model=model_dir, device="cpu", num_kv_blocks=64), progress=False)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        eng.add_request(str(i), eng.tokenizer.encode(prompt), params)
    texts = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                texts[out.request_id] = out.outputs[0].text
    return [texts[str(i)] for i in range(len(PROMPTS))]


def _completions(url: str) -> list[str]:
    def one(prompt):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: they batch on the ranks
        return list(pool.map(one, PROMPTS))


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").iterdir():
            for child in (task / "children").read_text().split():
                todo.append(int(child))
                found.append(int(child))
    return found


def _workers(pid: int) -> list[int]:
    """The tensor-parallel workers vibee launched among the descendants of `pid`."""
    return [child for child in _descendants(pid)
            if b"vibee.runtime.rank_worker" in Path(f"/proc/{child}/cmdline").read_bytes()]


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")  # a zombie is gone
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker through /proc")
def test_two_ranks_serve_the_one_rank_completions_then_stop_cleanly(model_dir, tmp_path):  # noqa: F811
    expected = _tp1_texts(model_dir)
    proc, log, reader, url = _start_serving(model_dir, tmp_path, "--tensor-parallel-size", "2")
    try:
        assert _completions(url) == expected
        info = httpx.get(url + "/v1/inference/info", timeout=30).json()["tensor_parallel"]
        assert info["enabled"] and info["tp_size"] == 2 and info["launcher"] == "vibee"
        assert len(_workers(proc.pid)) == 1
        proc.send_signal(signal.SIGTERM)
    finally:
        out = _stopped(proc, reader, log, 0)
    assert "tensor parallel over 2 ranks (gloo, launched by vibee)" in out and "Traceback" not in out, out


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker through /proc")
def test_serve_exits_with_the_reason_when_a_worker_rank_dies(model_dir, tmp_path):  # noqa: F811
    proc, log, reader, url = _start_serving(model_dir, tmp_path, "--tensor-parallel-size", "2")
    (worker,) = _workers(proc.pid)
    os.kill(worker, signal.SIGKILL)
    out = _stopped(proc, reader, log, 1)  # idle: the engine notices between steps, within a poll
    assert "tensor-parallel rank 1 exited (exit code -9); stopping the engine" in out, out
    assert "vibee serve stopped" in out, out


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks through /proc")
def test_torchrun_ranks_serve_the_one_rank_completions(model_dir, tmp_path):  # noqa: F811
    expected = _tp1_texts(model_dir)
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "vibee.cli", "serve")
    proc, log, reader, url = _start_serving(model_dir, tmp_path, "--tensor-parallel-size", "2", launcher=torchrun)
    ranks = _descendants(proc.pid)
    try:
        assert _completions(url) == expected
        info = httpx.get(url + "/v1/inference/info", timeout=30).json()["tensor_parallel"]
        assert info["launcher"] == "torchrun" and info["rank_devices"] == ["cpu", "cpu"]
    finally:
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank
        try:
            proc.wait(60)
        finally:
            with contextlib.suppress(ProcessLookupError):  # anything left of the group
                os.killpg(proc.pid, signal.SIGKILL)
        reader.join(5)
    assert all(_gone(pid) for pid in ranks), "".join(log)
