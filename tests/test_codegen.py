"""`vibee gen` is deterministic, leaves unchanged files alone, marks every file DO NOT EDIT, and
`vibee gen --check` fails on stale or hand-edited output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs" / "tri").glob("*.vibee"))


def vibee(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vibee", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture
def project(tmp_path):
    """A copy of the project's specs with a fresh output dir beside them."""
    shutil.copytree(ROOT / "specs", tmp_path / "specs")
    return tmp_path


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_all_six_kinds_have_a_spec():
    assert {p.stem for p in SPECS} == {
        "igla_kv_cache", "igla_flash_attention", "igla_quantization",
        "igla_speculative_decode", "igla_continuous_batch", "igla_tensor_parallel",
    }


def test_gen_is_deterministic_and_skips_unchanged_files(project):
    specs = [f"specs/tri/{p.name}" for p in SPECS]
    first = vibee("gen", *specs, cwd=project)
    assert first.returncode == 0, first.stderr
    out = project / "output"
    snap = _snapshot(out)
    assert len(snap) == 3 * len(SPECS) + 3  # module, reference, test per spec; __init__, conftest, manifest
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.py")}
    second = vibee("gen", *specs, cwd=project)
    assert second.returncode == 0 and "0 written" in second.stdout
    assert _snapshot(out) == snap
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.py")} == mtimes
    # generating from another directory gives the same bytes (headers name specs relative to the project)
    elsewhere = vibee("gen", "--out", str(out), *[str(project / s) for s in specs], cwd=project / "specs")
    assert elsewhere.returncode == 0 and _snapshot(out) == snap


def test_every_generated_file_says_do_not_edit_and_names_its_spec(project):
    assert vibee("gen", "specs/tri/igla_kv_cache.vibee", cwd=project).returncode == 0
    out = project / "output"
    spec_hash = json.loads((out / "MANIFEST.json").read_text())["files"]["vibee_gen/igla_kv_cache.py"]["spec_sha256"]
    for rel in ("vibee_gen/igla_kv_cache.py", "vibee_gen/igla_kv_cache_reference.py", "tests/test_igla_kv_cache.py"):
        head = (out / rel).read_text().splitlines()[:2]
        assert head[0].startswith("# DO NOT EDIT") and "specs/tri/igla_kv_cache.vibee" in head[0]
        assert spec_hash in head[1]
        compile((out / rel).read_text(), rel, "exec")


def test_check_passes_when_current_and_fails_on_stale_or_hand_edited(project):
    spec = "specs/tri/igla_kv_cache.vibee"
    assert vibee("gen", spec, cwd=project).returncode == 0
    ok = vibee("gen", "--check", spec, cwd=project)
    assert ok.returncode == 0, ok.stderr

    module = project / "output" / "vibee_gen" / "igla_kv_cache.py"
    original = module.read_text()
    module.write_text(original.replace("KV_DTYPE = 'auto'", "KV_DTYPE = 'int8'"))
    edited = vibee("gen", "--check", spec, cwd=project)
    assert edited.returncode == 1 and "igla_kv_cache.py: hand-edited" in edited.stderr
    module.write_text(original)

    spec_path = project / spec
    spec_path.write_text(spec_path.read_text().replace("kv_dtype: auto", "kv_dtype: int8", 1))
    stale = vibee("gen", "--check", spec, cwd=project)
    assert stale.returncode == 1 and "stale (spec changed)" in stale.stderr
    assert module.read_text() == original  # --check writes nothing
    assert vibee("gen", spec, cwd=project).returncode == 0
    assert "KV_DTYPE = 'int8'" in module.read_text()
    assert vibee("gen", "--check", spec, cwd=project).returncode == 0


def test_check_reports_missing_output(project):
    result = vibee("gen", "--check", "specs/tri/igla_kv_cache.vibee", cwd=project)
    assert result.returncode == 1 and "missing" in result.stderr


def test_committed_output_is_current():
    result = vibee("gen", "--check", *[str(p) for p in SPECS], cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_explain_shows_defaults_and_derived_figures(project):
    result = vibee("explain", "--json", "specs/tri/igla_kv_cache.vibee", cwd=project)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["spec"]["config"]["block_size"] == 16
    from vibee.kinds.kv_cache.config import KVCacheConfig

    assert set(data["spec"]["config"]) == set(KVCacheConfig.model_fields)  # every setting, defaults filled in
    assert data["derived"]
    pretty = vibee("explain", "specs/tri/igla_flash_attention.vibee", cwd=project)
    assert pretty.returncode == 0 and "variants" in pretty.stdout and "derived" in pretty.stdout
