"""One escaping rule at the render boundary: whatever text a spec puts where a template writes
it (descriptions, given/when/then, test case names and data, type and field descriptions,
expression sources, the spec's own file name), the generated files parse, and their code is token for token the code of
a spec with plain text there: spec text lands only inside string literals and comments."""

from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vibee.codegen.generate import plan
from vibee.codegen.source import literal, to_source
from vibee.ir.load import load_specs

ROOT = Path(__file__).resolve().parent.parent
SHIPPED, _ = load_specs(sorted((ROOT / "specs" / "tri").glob("*.vibee")))
TRICKY = ['"', "'", '"""', "'''", "\\", "\x00", "\r", "\n", "\r\n", "\u2028", "\x0c", "\t", "#", "{{ x }}", "{%", ") ; import os", "\\N", "é"]
text_strategy = st.lists(st.one_of(st.sampled_from(TRICKY), st.text(max_size=4)), max_size=8).map("".join)


def with_text(spec, text: str, folder: Path):
    """spec with text at every string site a template may write, its file named after text too."""
    def expr(e):
        return e if e is None else e.model_copy(update={"source": text})

    def strings(value):  # test case data: every string value in it (the keys are the kind's)
        if isinstance(value, dict):
            return {k: strings(v) for k, v in value.items()}
        if isinstance(value, list):
            return [strings(v) for v in value]
        return text + value if isinstance(value, str) else value

    def cases(cs, tag):
        return [c.model_copy(update={"name": f"{text}{tag}{i}", "input": strings(c.input), "expected": strings(c.expected)})
                for i, c in enumerate(cs)]

    behaviors = [b.model_copy(update={"given": text, "when": text, "then": text, "test_cases": cases(b.test_cases, f"b{j}")})
                 for j, b in enumerate(spec.behaviors)]
    types = [t.model_copy(update={"description": text, "fields": [f.model_copy(update={"description": text}) for f in t.fields]})
             for t in spec.types]
    variants = [v.model_copy(update={"score_mod": expr(v.score_mod), "mask_mod": expr(v.mask_mod)}) for v in spec.variants]
    file_name = text.replace("\x00", "").replace("/", "") + f"_{spec.module}.vibee"
    return spec.model_copy(update={
        "description": text, "name": text, "version": text, "behaviors": behaviors, "types": types,
        "variants": variants, "test_cases": cases(spec.test_cases, "t"), "path": str(folder / file_name),
    })


def code_tokens(source: str) -> list[tuple[int, str]]:
    """The tokens of a Python file that are code: everything but string literals and comments."""
    skip = {tokenize.STRING, tokenize.COMMENT, tokenize.NL}
    return [(t.type, t.string) for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type not in skip]


_PLAIN: dict[str, list[tuple[int, str]]] = {}  # the plain spec's code tokens per file, made once


def _generated(text: str, folder: Path) -> dict[str, str]:
    files = plan([with_text(spec, text, folder) for spec in SHIPPED], folder / "output")
    return {f.relpath: f.content for f in files if f.relpath.endswith(".py")}


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(text=text_strategy)
def test_spec_text_reaches_generated_code_only_inside_literals_and_comments(tmp_path, text):
    if not _PLAIN:
        _PLAIN.update({rel: code_tokens(source) for rel, source in _generated("plain text", tmp_path).items()})
    tricky = _generated(text, tmp_path)
    assert tricky.keys() == _PLAIN.keys()
    for rel, source in tricky.items():
        ast.parse(source, rel)
        assert code_tokens(source) == _PLAIN[rel], rel


@pytest.mark.parametrize("ending", ['"', "'''", '"""', "\x00", "\\"])
def test_description_and_behavior_text_ending_in_a_quote_or_nul_generate_and_keep_their_text(gen_from_text, spec_text, ending):
    escaped = ending.replace("\\", "\\\\").replace('"', '\\"').replace("\x00", "\\0")
    new_description = f'description: "Drafts and checks {escaped}"\n'
    text = re.sub(r"^description: [|>]\n(  .*\n)+", lambda _: new_description, spec_text("speculative_decode"), flags=re.M)
    text = text.replace("when: the n-gram drafter proposes", f'when: "the n-gram drafter proposes {escaped}"', 1)
    result = gen_from_text(text, name="igla_speculative_decode", target="torch")
    assert result.impl.__doc__.startswith(f"Drafts and checks {ending}")
    assert f"When the n-gram drafter proposes {ending}" in result.impl.NgramDrafter.propose.__doc__


@pytest.mark.parametrize("name", ["evil\nimport os", "evil\rimport os", "evil\u2028x"])
def test_a_spec_file_name_with_line_breaks_stays_inside_the_header_comment(tmp_path, spec_text, name):
    spec = tmp_path / f"{name}.vibee"
    spec.write_text(spec_text("kv_cache"), encoding="utf-8")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "vibee", "gen", "--out", str(out), str(spec)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for path in (out / "vibee_gen").glob("igla_*.py"):
        source = path.read_text(encoding="utf-8")
        ast.parse(source)
        head = source.split("\n")[:3]
        assert all(line.startswith("# ") for line in head)
        assert head[0].endswith(name.encode("unicode_escape").decode("ascii") + ".vibee")
        assert "\r" not in source and "\u2028" not in source


def test_every_value_a_template_writes_becomes_a_literal_unless_vibee_made_it_source():
    assert to_source("x'\"\n") == repr("x'\"\n")
    assert to_source(["a", 1, 2.5, None, {"k": True}]) == "['a', 1, 2.5, None, {'k': True}]"
    assert to_source(float("inf")) == "float('inf')"
    assert to_source(literal("already")) == "'already'"
    with pytest.raises(TypeError):
        to_source(object())
