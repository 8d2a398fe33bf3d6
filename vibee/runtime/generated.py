"""The runtime's one door to the generated modules.

The server runs the code `vibee gen` makes from the specs. When the specs and flags give exactly
what output/ holds, the modules come from output/vibee_gen (the files a user can read). A flag
that changes a compiled-in choice (`--block-size`, `--quant int8`, ...) or a `--spec-dir` with
other specs is applied to the IR and generated again into a cache directory keyed by the content,
so flags and specs go through the same validation and the same templates.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from vibee.codegen import generate
from vibee.ir.load import load_specs
from vibee.ir.spec import Spec
from vibee.kinds.registry import KIND_NAMES
from vibee.frontend.errors import Diagnostic, SpecError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SPEC_DIR = REPO_ROOT / "specs" / "tri"
COMMITTED_OUTPUT = REPO_ROOT / "output"


@dataclass
class GeneratedModules:
    """The imported modules of one generation, by kind, and the specs they came from."""

    specs: dict[str, Spec]
    source: Path  # the directory the modules were imported from
    modules: dict[str, ModuleType] = field(default_factory=dict)

    def __getattr__(self, name: str) -> ModuleType:
        modules = self.__dict__.get("modules", {})
        if name in modules:
            return modules[name]
        raise AttributeError(name)

    def config(self, kind: str) -> Any:
        return self.specs[kind].config


def cache_dir() -> Path:
    base = os.environ.get("VIBEE_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "vibee")
    return Path(base) / "gen"


def _apply_overrides(spec: Spec, updates: dict[str, Any]) -> Spec:
    """The spec with some config values replaced, validated by the kind's config model; an
    invalid value is a SpecError naming the flag's setting and what the spec allows."""
    merged = spec.config.model_dump()
    for key, value in updates.items():
        node = merged
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    try:
        config = type(spec.config).model_validate(merged)
    except ValueError as exc:
        detail = "; ".join(e.get("msg", str(e)) for e in getattr(exc, "errors", lambda: [])()) or str(exc)
        settings = ", ".join(f"{k}={v!r}" for k, v in updates.items())
        raise SpecError([Diagnostic(f"{spec.kind}: {settings} is not allowed: {detail}", spec.span)]) from None
    return spec.model_copy(update={"config": config})


def load_generated(spec_dir: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None,
                   target: str | None = None) -> GeneratedModules:
    """Load the six specs of `spec_dir` (default specs/tri), apply `overrides` ({kind: {dotted
    config key: value}}), and import what they generate for `target` (default: each spec's
    `language:`; the triton modules run their kernels on CUDA tensors and the torch path
    elsewhere). Raises SpecError."""
    spec_dir = Path(spec_dir) if spec_dir is not None else DEFAULT_SPEC_DIR
    paths = sorted(spec_dir.glob("*.vibee"))
    if not paths:
        raise SpecError([Diagnostic(f"{spec_dir}: no .vibee spec files here", None)])
    specs, _warnings = load_specs(paths, target=target)
    by_kind = {spec.kind: spec for spec in specs}
    missing = [k for k in KIND_NAMES if k not in by_kind]
    if missing:
        raise SpecError([Diagnostic(f"{spec_dir}: no spec of kind {', '.join(missing)} (the server needs all six)", None)])
    for kind, updates in (overrides or {}).items():
        if updates:
            by_kind[kind] = _apply_overrides(by_kind[kind], updates)
    chosen = [by_kind[k] for k in KIND_NAMES]

    files = generate.plan(chosen, COMMITTED_OUTPUT)
    if spec_dir.resolve() == DEFAULT_SPEC_DIR.resolve() and not generate.check(files, COMMITTED_OUTPUT):
        source = COMMITTED_OUTPUT
    else:
        digest = hashlib.sha256("".join(f.relpath + f.sha256 for f in files).encode()).hexdigest()[:16]
        source = cache_dir() / digest
        if not (source / "vibee_gen").is_dir() or generate.check(files, source):
            generate.write(files, source)
    modules = {}
    for spec in chosen:
        modules[spec.kind] = _import(source, spec.module)
        modules[f"{spec.kind}_reference"] = _import(source, f"{spec.module}_reference")
    return GeneratedModules(specs=by_kind, source=source, modules=modules)


def _import(source: Path, module: str) -> ModuleType:
    """Import vibee_gen/<module>.py under a name unique to its directory, so two generations
    (say a test's and the server's) can live in one process."""
    path = source / "vibee_gen" / f"{module}.py"
    tag = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:10]
    name = f"_vibee_gen_{tag}.{module}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
