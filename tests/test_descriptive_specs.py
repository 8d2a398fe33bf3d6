"""Specs in the older, descriptive style (header, types with fields, given/when/then behaviors,
descriptive test cases, sections the generator does not know, `language: zig`) generate working
modules with default configuration under `--target torch`, and their generated tests pass."""

from __future__ import annotations

import pytest

from vibee.kinds.registry import KIND_NAMES

DESCRIPTIVE = """\
name: igla_{kind}
version: "1.0.0"
language: zig
module: igla_{kind}

# Descriptive specs carry prose, not knobs.
types:
  {Kind}Notes:
    fields:
      enabled: Bool
      sizes: "[]u32"
      label: ?String

behaviors:
  - name: {kind}_lookup
    Given: Layer, position, and KV
    When: Attention computed
    Then: Return cached KV or compute new

test_cases:
  - name: test_memory
    input: {{ layers: 32, heads: 32, dim: 128 }}
    expected: {{ speedup_range: [2.0, 4.0] }}

creation_pattern:
  source: AttentionLayer
  transformer: {Kind}Wrapper
"""


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_descriptive_spec_generates_working_module(kind, gen_from_text):
    text = DESCRIPTIVE.format(kind=kind, Kind="".join(p.title() for p in kind.split("_")))
    result = gen_from_text(text, name=f"igla_{kind}", target="torch")
    spec = result.spec
    assert spec.legacy and spec.kind == kind and spec.config == type(spec.config)()
    assert spec.types[0].fields[1].type == "List<Int>" and spec.types[0].fields[2].type == "Option<String>"
    assert spec.behaviors[0].then == "Return cached KV or compute new"
    assert [c.name for c in spec.ignored_test_cases] == ["test_memory"]
    assert "creation_pattern" in spec.extra
    assert result.run_tests() == 0


def test_type_named_like_a_generated_class_is_a_spec_error(gen_from_text, spec_text):
    from vibee.frontend.errors import SpecError

    text = DESCRIPTIVE.format(kind="continuous_batch", Kind="ContinuousBatch").replace("ContinuousBatchNotes:", "Scheduler:")
    for _ in range(2):  # the second time from the checks remembered for this spec and text
        with pytest.raises(SpecError, match="type 'Scheduler' clashes with a name the generated continuous_batch module binds"):
            gen_from_text(text, name="igla_continuous_batch", target="torch")


def test_a_plan_checks_each_rendered_file_once_per_spec(monkeypatch, spec_text, tmp_path):
    """Rendered files are parsed and checked once per spec and text: a process that builds many
    engines (tests, the server's restarts) plans the same six specs each time."""
    from vibee.codegen import generate
    from vibee.ir.load import load_specs

    checked = []
    monkeypatch.setattr(generate, "_CHECKED", {})
    monkeypatch.setattr(generate, "clashes", lambda spec, text, template: checked.append(template) or [])
    path = tmp_path / "igla_kv_cache.vibee"
    path.write_text(spec_text("kv_cache"), encoding="utf-8")
    (spec,), _ = load_specs([path])
    generate.plan([spec], tmp_path)
    assert len(checked) == 3
    generate.plan([spec], tmp_path)
    assert len(checked) == 3
    path.write_text(spec_text("kv_cache").replace("block_size: 16", "block_size: 8"), encoding="utf-8")
    (changed,), _ = load_specs([path])
    generate.plan([changed], tmp_path)
    assert len(checked) == 6
