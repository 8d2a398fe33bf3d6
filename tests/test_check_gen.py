"""`vibee check` promises what `vibee gen` delivers: any spec text that check accepts generates,
the generated modules import, and for the shipped specs changed as a user would (a knob set to
another valid value, a description rewritten) the generated suites pass."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import re
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from spec_edit import with_knob
from test_spec_pipeline_fuzz import edited_spec
from vibee.codegen.generate import plan, write
from vibee.frontend.errors import SpecError
from vibee.ir.load import load_specs

SPEC_DIR = Path(__file__).resolve().parent.parent / "specs" / "tri"
SPECS = {p.stem: p.read_text(encoding="utf-8") for p in sorted(SPEC_DIR.glob("*.vibee"))}
# Names a user might give a type, field, variant or test case that the generated code also uses.
NAMES = ["torch", "math", "dataclass", "field", "fields", "triton", "tl", "np", "F", "nn", "len", "int", "Sequence",
         "annotations", "impl", "ref", "pytest", "MemoryStats", "Scheduler", "x_reference", "__init__", "__slots__", "__file__", "Stats"]
_counter = itertools.count()


def _declared_names(text: str) -> dict[str, list[str]]:
    """The identifier sites of a spec, as the text that declares them, by what they name."""
    types = text.split("\ntypes:", 1)[1].split("\n\n", 1)[0] if "\ntypes:" in text else ""
    return {
        "type": re.findall(r"^  [A-Za-z_]\w*:[ \t]*$", types, re.M),
        "field": re.findall(r"^      [A-Za-z_]\w*: ", types, re.M),
        "name": re.findall(r"- name: [A-Za-z_]\w*", text),  # behaviors, variants, test cases
        "module": re.findall(r"^module: \w+", text, re.M),
    }


@st.composite
def renamed_spec(draw):
    """A shipped spec with one declared name (a type's, a field's, ...) renamed to a name that
    generated code uses."""
    stem = draw(st.sampled_from(sorted(SPECS)))
    text = SPECS[stem]
    sites = {what: found for what, found in _declared_names(text).items() if found}
    site = draw(st.sampled_from(sites[draw(st.sampled_from(sorted(sites)))]))
    name = re.search(r"(?:- name: |module: |^ +)([A-Za-z_]\w*)", site).group(1)
    return stem, text.replace(site, site.replace(name, draw(st.sampled_from(NAMES)), 1), 1)


def _import(path: Path):
    name = f"_check_gen_{next(_counter)}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=st.one_of(renamed_spec(), renamed_spec(), edited_spec().map(lambda c: (c[0].removesuffix(".vibee"), c[1]))),
       target=st.sampled_from(["torch", "triton"]))
def test_what_check_accepts_generates_and_imports(tmp_path, case, target):
    stem, text = case
    path = tmp_path / f"{stem}.vibee"
    path.write_text(text, encoding="utf-8")
    out = tmp_path / f"out{next(_counter)}"
    try:
        specs, _ = load_specs([path], target)
        files = plan(specs, out)  # what `vibee check` runs after loading
    except SpecError as exc:
        assert all(d.span is not None for d in exc.diagnostics if d.severity == "error"), exc.render()
        event("check refused it")
        return
    event("check accepted it")
    write(files, out)
    (spec,) = specs
    impl = _import(out / "vibee_gen" / f"{spec.module}.py")
    _import(out / "vibee_gen" / f"{spec.module}_reference.py")
    for t in spec.types:  # the spec's types are the module's dataclasses, every field defaulted
        record = getattr(impl, t.name)()
        assert [f.name for f in dataclasses.fields(record)] == [f.name for f in t.fields]
    compile((out / "tests" / f"test_{spec.module}.py").read_text(encoding="utf-8"), "test", "exec")


def _described(text: str, description: str) -> str:
    return re.sub(r"^description: [|>]\n(  .*\n)+", lambda _: f"description: {description}\n", text, count=1, flags=re.M)


MUTATIONS = [
    ("kv_cache", lambda t: with_knob(_described(t, "A cache whose blocks hold 32 tokens."), "block_size", "32")),
    ("kv_cache", lambda t: with_knob(t, "gpu_memory_utilization", "0.5")),
    ("continuous_batch", lambda t: with_knob(t, "watermark", "0.02")),
    ("speculative_decode", lambda t: with_knob(t, "verification", "greedy")),
]


@pytest.mark.slow
@pytest.mark.parametrize("kind, mutate", MUTATIONS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(MUTATIONS)])
def test_generated_suites_pass_for_changed_shipped_specs(gen_from_text, spec_text, kind, mutate):
    result = gen_from_text(mutate(spec_text(kind)), name=f"igla_{kind}", target="torch")
    assert result.run_tests() == 0
