"""Fixtures for tests that run the whole pipeline: spec text -> generated modules -> their tests."""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPEC_DIR = ROOT / "specs" / "tri"
_counter = itertools.count()


def _import_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def spec_text():
    """The text of a shipped spec: spec_text("kv_cache") -> specs/tri/igla_kv_cache.vibee."""

    def read(kind: str) -> str:
        return (SPEC_DIR / f"igla_{kind}.vibee").read_text(encoding="utf-8")

    return read


@pytest.fixture
def gen_from_text(tmp_path):
    """Write spec text to a temp file, generate it, import the generated implementation/reference."""
    from vibee.codegen.generate import plan, write
    from vibee.ir.load import load_specs

    def generate(text: str, name: str = "spec", target: str | None = None) -> types.SimpleNamespace:
        n = next(_counter)
        spec_path = tmp_path / f"specs{n}" / f"{name}.vibee"
        spec_path.parent.mkdir(parents=True)
        spec_path.write_text(text, encoding="utf-8")
        out = tmp_path / f"out{n}"
        (spec,), _ = load_specs([spec_path], target)
        write(plan([spec], out), out)
        impl = _import_file(out / "vibee_gen" / f"{spec.module}.py", f"_vibee_test_{n}_{spec.module}")
        ref = _import_file(out / "vibee_gen" / f"{spec.module}_reference.py", f"_vibee_test_{n}_{spec.module}_reference")
        test_file = out / "tests" / f"test_{spec.module}.py"

        def run_tests(*args: str) -> int:
            # no plugin autoload: the generated suites use none, and loading every installed one
            # (and rewriting their asserts) was most of each run's start-up
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(out), str(ROOT)]), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
            cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(test_file), *args]
            return subprocess.run(cmd, cwd=out, env=env).returncode

        return types.SimpleNamespace(out=out, spec=spec, impl=impl, ref=ref, test_file=test_file, run_tests=run_tests)

    return generate
