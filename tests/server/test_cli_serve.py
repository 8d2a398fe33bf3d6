"""`vibee serve` as a user runs it: a subprocess that prints what it loaded, serves, refuses flags
it can't honour (checked in this process), and on SIGTERM finishes the response in flight and exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.runtime.hf_models import make_model

pytestmark = pytest.mark.slow
VIBEE = [sys.executable, "-m", "vibee.cli"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "tiny"
    make_model(path, "llama", hidden=64, heads=4, kv_heads=2, layers=2)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path) -> dict:
    return {**os.environ, "VIBEE_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def _start_serving(model_dir, tmp_path, *args, launcher=(*VIBEE, "serve")):
    """(the `vibee serve` process, its log lines so far, its reader thread, its URL) once healthy.
    It leads a process group of its own, as a command started from a terminal does."""
    port = _free_port()
    proc = subprocess.Popen([*launcher, "--model", str(model_dir), "--port", str(port), "--num-kv-blocks", "64", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(tmp_path),
                            start_new_session=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, log, reader, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("".join(log))
        time.sleep(0.2)


def _stopped(proc, reader, log, code: int) -> str:
    """Wait for `vibee serve` to exit with `code` (killed if it does not) and return its output."""
    try:
        assert proc.wait(60) == code, "".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(5)
    return "".join(log)


def _engine_processes(pid: int) -> list[int]:
    """The children of `pid` that multiprocessing spawned, but its resource tracker."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
                found.append(int(child))
    return found


def test_serve_streams_then_shuts_down_cleanly(model_dir, tmp_path):
    proc, log, reader, url = _start_serving(model_dir, tmp_path)
    port = url.rsplit(":", 1)[1]
    try:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 200, "stream": True, "ignore_eos": True}
        chunks = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line[6:])
                    if len(chunks) == 3:
                        proc.send_signal(signal.SIGTERM)  # mid-stream: the response must still finish
        assert chunks[-1] == "[DONE]"
        final = json.loads(chunks[-2])
        assert final["choices"][0]["finish_reason"] == "length"
    finally:
        out = _stopped(proc, reader, log, 0)
    assert "kv cache   64 blocks x 16 tokens = 1024 tokens" in out
    assert f"http://127.0.0.1:{port}/v1" in out
    assert "vibee serve: stopped" in out
    assert "Traceback" not in out


def test_ctrl_c_to_the_process_group_stops_serving_cleanly(model_dir, tmp_path):
    """Ctrl-C in a terminal signals every process of the group, the engine's too: the server
    stops it, and nothing is reported as a crash."""
    proc, log, reader, url = _start_serving(model_dir, tmp_path)
    os.killpg(proc.pid, signal.SIGINT)
    out = _stopped(proc, reader, log, 0)
    assert "vibee serve: stopped" in out and "engine process exited" not in out and "Traceback" not in out, out


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the engine process through /proc")
def test_serve_exits_with_the_reason_when_the_engine_process_dies(model_dir, tmp_path):
    proc, log, reader, url = _start_serving(model_dir, tmp_path)
    (engine_pid,) = _engine_processes(proc.pid)
    os.kill(engine_pid, signal.SIGKILL)
    out = _stopped(proc, reader, log, 1)
    assert "the engine process exited (exit code -9); vibee serve stopped" in out, out


def _refused(args: list[str], tmp_path, monkeypatch, capfd) -> str:
    """`vibee serve ARGS` run in this process (what is checked is the refusal, not the process
    start), as test_engine_flags does: it must exit 2 with no traceback, from the flags' check or
    from the engine process it starts (whose output capfd holds); its stderr. A serve that does
    not refuse fails the test rather than serving."""
    import prometheus_client.metrics
    from click.testing import CliRunner

    import vibee.runtime.serve
    from vibee.cli import main

    for name in ("VIBEE_CACHE_DIR", "OMP_NUM_THREADS"):
        monkeypatch.setenv(name, _env(tmp_path)[name])
    monkeypatch.setattr(prometheus_client.metrics, "_use_created", prometheus_client.metrics._use_created)
    monkeypatch.setattr(vibee.runtime.serve, "_serve", lambda *a, **k: pytest.fail("it served"))
    result = CliRunner().invoke(main, ["serve", *args])
    children = capfd.readouterr().err
    assert result.exit_code == 2, (result.output, result.exception, children)
    assert "Traceback" not in result.stderr and "Traceback" not in children, (result.stderr, children)
    return result.stderr


@pytest.mark.parametrize("args, message", [
    (["--num-speculative-tokens", "3"], "--num-speculative-tokens needs --speculative"),
    (["--tensor-parallel-size", "3"], "tp_size"),
    (["--block-size", "24"], "block_size"),
    (["--max-model-len", "100000"], "longer than the model's max_position_embeddings"),
    (["--max-num-seqs", "0"], "--max-num-seqs"),
])
def test_serve_refuses_what_it_cannot_do(model_dir, tmp_path, args, message, monkeypatch, capfd):
    assert message in _refused(["--model", str(model_dir), *args], tmp_path, monkeypatch, capfd)


def test_serve_names_a_broken_model_dir(tmp_path, monkeypatch, capfd):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert "config.json" in _refused(["--model", str(broken)], tmp_path, monkeypatch, capfd)
