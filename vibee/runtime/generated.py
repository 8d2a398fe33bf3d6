"""The runtime's one door to the generated modules, typed by the kinds' Protocols.

A knob setting (a serve flag) is applied to the values the spec wrote and validated by the kind's
config model, so a flag and a spec value obey the same rules and defaults. What happens next
depends on the knob's stage: a runtime knob only changes the config the runtime passes to the
generated code (`GeneratedModules.configs`); a compile knob changes what is generated, and only
its own kind is generated again, into a cache directory keyed by the content. Every kind whose
generated files are what output/ holds is imported from output/vibee_gen, the files a user reads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, cast

from pydantic import ValidationError

from vibee.codegen import generate
from vibee.frontend.errors import Diagnostic, SpecError
from vibee.ir.load import load_specs
from vibee.ir.spec import KindConfig, Spec
from vibee.kinds.continuous_batch.config import ContinuousBatchConfig
from vibee.kinds.continuous_batch.interface import ContinuousBatchModule
from vibee.kinds.decoder.config import DecoderConfig
from vibee.kinds.decoder.interface import DecoderModule
from vibee.kinds.flash_attention.config import FlashAttentionConfig
from vibee.kinds.flash_attention.interface import AttentionFunctions, FlashAttentionModule
from vibee.kinds.kv_cache.config import KVCacheConfig
from vibee.kinds.kv_cache.interface import KVCacheModule
from vibee.kinds.quantization.config import QuantizationConfig
from vibee.kinds.quantization.interface import QuantizationModule
from vibee.kinds.registry import KIND_NAMES, config_model
from vibee.kinds.speculative_decode.config import SpeculativeDecodeConfig
from vibee.kinds.speculative_decode.interface import SpeculativeDecodeModule
from vibee.kinds.tensor_parallel.config import TensorParallelConfig
from vibee.kinds.tensor_parallel.interface import TensorParallelModule

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SPEC_DIR = REPO_ROOT / "specs" / "tri"
COMMITTED_OUTPUT = REPO_ROOT / "output"

KnobSettings = dict[str, dict[str, Any]]  # {kind: {config field: value}}

@dataclass(frozen=True)
class KindConfigs:
    """Every kind's config as the runtime passes it to the generated code: the spec's values, then
    the knob settings of the flags."""

    kv_cache: KVCacheConfig
    flash_attention: FlashAttentionConfig
    quantization: QuantizationConfig
    speculative_decode: SpeculativeDecodeConfig
    continuous_batch: ContinuousBatchConfig
    tensor_parallel: TensorParallelConfig
    decoder: DecoderConfig


@dataclass(frozen=True)
class GeneratedModules:
    """The imported modules of one generation, each typed by its kind's Protocol."""

    kv_cache: KVCacheModule
    flash_attention: FlashAttentionModule
    flash_attention_reference: AttentionFunctions  # the oracle, served by --no-flash-attn
    quantization: QuantizationModule
    speculative_decode: SpeculativeDecodeModule
    continuous_batch: ContinuousBatchModule
    tensor_parallel: TensorParallelModule
    decoder: DecoderModule
    configs: KindConfigs
    specs: dict[str, Spec]  # what each kind's module was generated from
    sources: dict[str, Path]  # the directory each kind's module was imported from

    def config(self, kind: str) -> KindConfig:
        return cast(KindConfig, getattr(self.configs, kind))

    @property
    def regenerated(self) -> list[str]:
        """Kinds whose modules are not output/'s (a compile knob or another spec changed them)."""
        return [k for k in KIND_NAMES if self.sources[k] != COMMITTED_OUTPUT]

    @property
    def source(self) -> str:
        """Where the modules came from, for people."""
        if not self.regenerated:
            return str(COMMITTED_OUTPUT)
        others = ", ".join(f"{k} from {self.sources[k]}" for k in self.regenerated)
        return f"{COMMITTED_OUTPUT} ({others})" if len(self.regenerated) < len(KIND_NAMES) else others


def cache_dir() -> Path:
    base = os.environ.get("VIBEE_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "vibee")
    return Path(base) / "gen"


class KnobError(ValueError):
    """A knob setting the kind's config model rejects; the message names the flag that set it."""


def flag_of(kind: str, field: str) -> str:
    """The serve flag that sets kind.field, or the dotted name when it has none."""
    extra = config_model(kind).model_fields[field].json_schema_extra
    return extra.get("flag") or f"{kind}.{field}" if isinstance(extra, dict) else f"{kind}.{field}"


def _written(spec: Spec) -> dict[str, Any]:
    """The config values the spec wrote (top-level keys), so that defaults are the model's."""
    values = spec.config.model_dump()
    return {key: values[key] for key in spec.config_spans if "." not in key and key in values}


def _validated(spec: Spec, settings: dict[str, Any]) -> KindConfig:
    try:
        return type(spec.config).model_validate({**_written(spec), **settings})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            named = [f for f in settings if f == field] or list(settings)
            given = ", ".join(f"{flag_of(spec.kind, f)} {settings[f]!r}" for f in named)
            problems.append(f"{given}: {err['msg'].removeprefix('Value error, ')}")
        raise KnobError("; ".join(problems)) from None


def load_generated(spec_dir: str | Path | None = None, knobs: KnobSettings | None = None,
                   target: str | None = None) -> GeneratedModules:
    """Load one spec of each kind from `spec_dir` (default specs/tri), apply the knob settings ({kind:
    {config field: value}}), and import what they generate for `target` (default: each spec's
    `language:`). Raises SpecError for the specs, KnobError for a rejected setting."""
    spec_dir = Path(spec_dir) if spec_dir is not None else DEFAULT_SPEC_DIR
    paths = sorted(spec_dir.glob("*.vibee"))
    if not paths:
        raise SpecError([Diagnostic(f"{spec_dir}: no .vibee spec files here", None)])
    specs, _warnings = load_specs(paths, target=target)
    by_kind = {spec.kind: spec for spec in specs}
    missing = [k for k in KIND_NAMES if k not in by_kind]
    if missing:
        shipped = ", ".join(f"specs/tri/igla_{k}.vibee" for k in missing)
        raise SpecError([Diagnostic(f"{spec_dir}: no spec of kind {', '.join(missing)} (the server needs one of each kind)", None,
                                    f"copy {shipped} there and edit it")])
    unknown = [f"{kind}.{f}" for kind, values in (knobs or {}).items() for f in values
               if kind not in by_kind or f not in type(by_kind[kind].config).model_fields]
    if unknown:
        raise KnobError(f"no such knob: {', '.join(unknown)}")

    settings = {kind: dict(values) for kind, values in (knobs or {}).items() if values}
    configs = {kind: _validated(by_kind[kind], settings[kind]) if kind in settings else by_kind[kind].config
               for kind in KIND_NAMES}

    generated: dict[str, Spec] = {}
    for kind in KIND_NAMES:
        spec = by_kind[kind]
        config_class = type(spec.config)
        compiled = {f: v for f, v in settings.get(kind, {}).items() if config_class.stage_of(f) == "compile"}
        generated[kind] = spec.model_copy(update={"config": _validated(spec, compiled)}) if compiled else spec

    modules: dict[str, Any] = {}
    sources: dict[str, Path] = {}
    for kind in KIND_NAMES:
        spec = generated[kind]
        sources[kind] = source = _generated_dir(spec)
        modules[kind] = _import(source, spec.module)
    reference = _import(sources["flash_attention"], f"{generated['flash_attention'].module}_reference")
    return GeneratedModules(**modules, flash_attention_reference=cast(AttentionFunctions, reference),
                            configs=KindConfigs(**configs), specs=generated, sources=sources)


def _generated_dir(spec: Spec) -> Path:
    """output/ when it holds what this spec generates, else a cache directory named by the files."""
    files = generate.plan([spec], COMMITTED_OUTPUT)
    if not generate.check(files, COMMITTED_OUTPUT):
        return COMMITTED_OUTPUT
    digest = hashlib.sha256("".join(f.relpath + f.sha256 for f in files).encode()).hexdigest()[:16]
    source = cache_dir() / digest
    if generate.check(files, source):
        generate.write(files, source)
    return source


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
