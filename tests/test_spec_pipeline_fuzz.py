"""Property: any edit of a real spec gives either a valid IR or a SpecError from the whole front
end (parse, build, expressions, config validation), never any other exception."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vibee.ir.build import build_spec
from vibee.frontend.errors import SpecError
from vibee.frontend.parser import parse_document

SPECS = {p.name: p.read_text(encoding="utf-8") for p in sorted((Path(__file__).resolve().parent.parent / "specs" / "tri").glob("*.vibee"))}
TOKENS = ["24", "-1", "0", "true", "null", "\"x\"", "'", "{", "}", "[", "]", ":", "- ", "#", "\t", "  ", "\n",
          "score.__class__", "__import__('os')", "tanh(", "q_idx <", "List<", "Flaot", "|", ">", "1e999", "lifo"]


def _front_end(text: str, name: str) -> None:
    try:
        build_spec(parse_document(text, name), name, text, None)
    except SpecError as exc:
        assert exc.diagnostics and all(d.message for d in exc.diagnostics)
        exc.render()  # rendering never fails either


@st.composite
def edited_spec(draw):
    name = draw(st.sampled_from(sorted(SPECS)))
    lines = SPECS[name].splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "insert", "replace_value", "swap"]))
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "insert":
            line = lines[i]
            pos = draw(st.integers(0, len(line)))
            lines[i] = line[:pos] + draw(st.sampled_from(TOKENS)) + line[pos:]
        elif op == "replace_value" and ":" in lines[i]:
            key = lines[i].split(":", 1)[0]
            lines[i] = f"{key}: {draw(st.sampled_from(TOKENS))}\n"
        elif op == "swap" and i + 1 < len(lines):
            lines[i], lines[i + 1] = lines[i + 1], lines[i]
        if not lines:
            break
    return name, "".join(lines)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edited_spec())
def test_edited_specs_give_ir_or_spec_error(case):
    name, text = case
    _front_end(text, name)


def test_shipped_specs_build_cleanly():
    for name, text in SPECS.items():
        spec, warnings = build_spec(parse_document(text, name), name, text, None)
        assert not warnings, [w.render() for w in warnings]
        assert spec.all_test_cases(), f"{name} has no test cases"
