"""Malformed specs get precise, positioned errors: message, line and column, a caret, a hint.

Each case is a valid spec with one mistake; `at` names the line (1-based) and the text on that
line the error must point at. The last cases check that several errors are all reported, that
warnings don't stop generation, and that the CLI prints diagnostics (exit 2) and no traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vibee.ir.load import load_specs
from vibee.frontend.errors import SpecError

KV = """\
name: igla_kv_cache
version: "1.0.0"
language: torch
module: igla_kv_cache
kind: kv_cache
config:
  block_size: 16
  kv_dtype: auto
  enable_prefix_caching: true
types:
  MemoryStats:
    fields:
      num_blocks: Int
      usage: Float
behaviors:
  - name: allocate_blocks
    given: a sequence of tokens
    when: it grows past a block boundary
    then: it gets one more block
test_cases:
  - name: basic
    input: { seq_lens: [1, 17], num_kv_heads: 2, head_dim: 8 }
    expected: { max_abs_err: 0.0 }
"""

ATTN = """\
name: igla_flash_attention
language: torch
kind: flash_attention
config:
  head_dims: [8, 64]
  causal: true
  prefill: { block_m: 32, block_n: 32 }
variants:
  - name: softcap
    params: { cap: 30.0 }
    score_mod: "cap * tanh(score / cap)"
test_cases:
  - name: small
    input: { seq_lens: [1, 17], heads: 4, kv_heads: 2, head_dim: 8 }
    expected: { max_abs_err: 1e-5 }
"""

SCHED = """\
name: igla_continuous_batch
language: torch
config:
  policy: fcfs
  max_num_seqs: 8
"""


def edit(base: str, old: str, new: str) -> str:
    assert old in base, old
    return base.replace(old, new, 1)


# (id, spec text, expected message fragment, line, text on that line the caret starts at, hint fragment or None)
CASES = [
    # syntax
    ("unterminated_quote", edit(KV, 'version: "1.0.0"', 'version: "1.0.0'), "", 2, '"', None),
    ("tab_indent", edit(KV, "  block_size: 16", "\tblock_size: 16"), "tab", 7, None, None),
    ("duplicate_key", edit(KV, "  kv_dtype: auto", "  block_size: 32"), "duplicate key 'block_size'", 8, "block_size", None),
    ("unclosed_flow_mapping", edit(ATTN, "block_n: 32 }\nvariants", "block_n: 32\nvariants"), "", 7, None, None),
    # header
    ("unsupported_language", edit(KV, "language: torch", "language: zig"), "unsupported language 'zig'", 3, "zig", "--target torch"),
    ("unknown_kind", edit(KV, "kind: kv_cache", "kind: kv_cach"), "unknown kind 'kv_cach'", 5, "kv_cach", "did you mean 'kv_cache'"),
    ("bad_module_name", edit(KV, "module: igla_kv_cache", "module: igla-kv-cache"), "not a valid Python module name", 4, "igla-kv-cache", None),
    ("section_typo", edit(KV, "config:", "confg:"), "unknown section 'confg'", 6, "confg", "did you mean 'config'"),
    ("kind_not_inferable", edit(edit(edit(KV, "kind: kv_cache\n", ""), "module: igla_kv_cache", "module: paged"), "name: igla_kv_cache", "name: paged"), "cannot tell the kind", 1, "paged", "kind:"),
    # config: types, ranges, unknown keys
    ("block_size_not_power_of_two", edit(KV, "block_size: 16", "block_size: 24"), "power of two", 7, "24", None),
    ("unknown_config_key", edit(KV, "block_size: 16", "blok_size: 16"), "unknown setting 'blok_size'", 7, "blok_size", "did you mean 'block_size'"),
    ("config_wrong_type", edit(KV, "block_size: 16", "block_size: sixteen"), "block_size", 7, "sixteen", None),
    ("config_bad_choice", edit(KV, "kv_dtype: auto", "kv_dtype: int3"), "kv_dtype must be one of", 8, "int3", "did you mean 'int8'"),
    ("nested_unknown_key", edit(ATTN, "block_m: 32", "block_mm: 32"), "unknown setting 'block_mm' in config.prefill", 7, "block_mm", "did you mean 'block_m'"),
    ("config_not_mapping", edit(KV, "config:\n  block_size: 16\n  kv_dtype: auto\n  enable_prefix_caching: true", "config: 16"), "'config' must be a mapping", 6, "16", None),
    ("memory_fraction_range", edit(KV, "kv_dtype: auto", "gpu_memory_utilization: 1.5"), "gpu_memory_utilization", 8, "1.5", None),
    ("policy_choice", edit(SCHED, "policy: fcfs", "policy: lifo"), "policy must be one of", 4, "lifo", None),
    # types
    ("unknown_field_type", edit(KV, "usage: Float", "usage: Flaot"), "unknown type 'Flaot'", 14, "Flaot", "did you mean 'Float'"),
    ("generic_without_args", edit(KV, "usage: Float", "usage: List"), "List needs type arguments", 14, None, None),
    ("field_named_like_python_internals", edit(KV, "usage: Float", "__init__: Float"), "field name '__init__' is reserved", 14, "__init__", "'init'"),
    ("field_not_identifier", edit(KV, "usage: Float", "usage-pct: Float"), "not an identifier", 14, "usage-pct", None),
    # behaviors
    ("unknown_behavior", edit(KV, "name: allocate_blocks", "name: alocate_blocks"), "unknown behavior 'alocate_blocks'", 16, "alocate_blocks", "did you mean 'allocate_blocks'"),
    ("behavior_key_typo", edit(KV, "given: a sequence", "gven: a sequence"), "unknown key 'gven' in behavior", 17, "gven", "did you mean 'given'"),
    ("behavior_not_mapping", edit(KV, "  - name: allocate_blocks\n    given: a sequence of tokens\n    when: it grows past a block boundary\n    then: it gets one more block", "  - allocate_blocks"), "a behavior must be a mapping", 16, "allocate_blocks", None),
    # test cases
    ("unknown_test_input", edit(KV, "seq_lens: [1, 17]", "seq_len: [1, 17]"), "unknown input key 'seq_len'", 22, "seq_len", "did you mean 'seq_lens'"),
    ("test_without_expected", edit(KV, "    expected: { max_abs_err: 0.0 }\n", ""), "has no 'expected:'", 21, "name", None),
    ("test_input_not_mapping", edit(KV, "input: { seq_lens: [1, 17], num_kv_heads: 2, head_dim: 8 }", "input: 17"), "'input' of test case 'basic' must be a mapping", 22, "17", None),
    # variants and expressions
    ("variants_on_wrong_kind", KV + 'variants:\n  - name: x\n    score_mod: "score"\n', "only apply to flash_attention", 24, "variants", None),
    ("expr_attribute_access", edit(ATTN, '"cap * tanh(score / cap)"', '"score.__class__"'), "", 11, ".", None),
    ("expr_import", edit(ATTN, '"cap * tanh(score / cap)"', '"__import__(\'os\').system(\'true\')"'), "", 11, "__import__", None),
    ("expr_unknown_name", edit(ATTN, '"cap * tanh(score / cap)"', '"cap * tanh(scroe / cap)"'), "scroe", 11, "scroe", "did you mean 'score'"),
    ("variant_without_expression", edit(ATTN, '    score_mod: "cap * tanh(score / cap)"\n', ""), "needs a score_mod or a mask_mod", 9, "name", None),
    ("test_case_undeclared_variant", edit(ATTN, "heads: 4,", "heads: 4, variants: [softcap, sofcap],"), "uses variant 'sofcap', which the spec does not declare", 14, "sofcap", "did you mean 'softcap'"),
    ("test_case_variants_not_a_list", edit(ATTN, "heads: 4,", "heads: 4, variants: softcap,"), "must be a list of variant names", 14, "softcap", None),
    # hints for values that are almost right, carets under the one list element at fault
    ("quoted_number", edit(KV, "block_size: 16", 'block_size: "16"'), "block_size", 7, '"16"', "remove the quotes: 16"),
    ("yes_for_a_bool", edit(KV, "enable_prefix_caching: true", "enable_prefix_caching: yes"), "enable_prefix_caching", 9, "yes", "use true or false: true"),
    ("float_for_an_int", edit(KV, "block_size: 16", "block_size: 16.0"), "block_size", 7, "16.0", "use 16"),
    ("bad_list_element", edit(ATTN, "head_dims: [8, 64]", "head_dims: [8, 100]"), "head dim 100 is not supported", 5, "100", None),
    ("quoted_list_element", edit(ATTN, "head_dims: [8, 64]", 'head_dims: [8, "64"]'), "head_dims.1", 5, '"64"', "remove the quotes: 64"),
]


def _load_text(tmp_path: Path, text: str, name: str = "spec"):
    path = tmp_path / f"{name}.vibee"
    path.write_text(text, encoding="utf-8")
    return load_specs([path])


def test_base_specs_are_valid(tmp_path):
    for i, text in enumerate((KV, ATTN, SCHED)):
        (spec,), _ = _load_text(tmp_path, text, f"base{i}")
        assert spec.module


@pytest.mark.parametrize("text, fragment, line, at, hint", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_spec_reports_position_and_message(tmp_path, text, fragment, line, at, hint):
    with pytest.raises(SpecError) as info:
        _load_text(tmp_path, text)
    errors = [d for d in info.value.diagnostics if d.severity == "error"]
    assert errors, "expected at least one error"
    first = errors[0]
    assert fragment in first.message, first.render()
    assert first.span is not None and first.span.line == line, first.render()
    if at is not None:
        src = text.splitlines()[line - 1]
        assert first.span.col == src.index(at) + 1, first.render()
    if hint is not None:
        assert first.hint and hint in first.hint, first.render()
    rendered = first.render()
    assert rendered.startswith(f"{tmp_path / 'spec.vibee'}:{first.span.line}:{first.span.col}: error: ")
    assert "^" in rendered and text.splitlines()[line - 1].strip() in rendered


def test_independent_errors_are_all_reported(tmp_path):
    text = edit(edit(edit(KV, "block_size: 16", "block_size: 24"), "usage: Float", "usage: Flaot"), "given: a sequence", "gven: a sequence")
    with pytest.raises(SpecError) as info:
        _load_text(tmp_path, text)
    lines = sorted(d.span.line for d in info.value.diagnostics if d.severity == "error")
    assert lines == [7, 14, 17]


def test_an_unknown_kind_is_one_error_not_a_cascade(tmp_path):
    text = (Path(__file__).resolve().parent.parent / "specs/tri/igla_flash_attention.vibee").read_text(encoding="utf-8")
    with pytest.raises(SpecError) as info:
        _load_text(tmp_path, edit(text, "kind: flash_attention", "kind: flash_atention"))
    (error,) = [d for d in info.value.diagnostics if d.severity == "error"]
    assert error.message == "unknown kind 'flash_atention'" and "did you mean 'flash_attention'" in error.hint


@pytest.mark.parametrize("name, language", [("torch", "torch"), ("hashlib", "torch"), ("OrderedDict", "torch"), ("dataclass", "torch"), ("field", "torch"),
                                            ("Sequence", "torch"), ("len", "torch"), ("triton", "triton"), ("tl", "triton")])
def test_check_rejects_a_type_named_like_what_the_generated_module_binds(tmp_path, name, language):
    path = tmp_path / "spec.vibee"
    path.write_text(edit(edit(KV, "language: torch", f"language: {language}"), "  MemoryStats:", f"  {name}:"), encoding="utf-8")
    for cmd in (["check"], ["gen", "--out", str(tmp_path / "out")]):
        result = _cli(*cmd, str(path))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert f"{path}:11:3: error: type '{name}'" in result.stderr and "help: rename the type" in result.stderr
    assert not (tmp_path / "out").exists()


def test_check_covers_the_target_gen_may_be_asked_for(tmp_path):
    path = tmp_path / "spec.vibee"
    path.write_text(edit(KV, "  MemoryStats:", "  tl:"), encoding="utf-8")  # language: torch
    assert _cli("gen", "--out", str(tmp_path / "out"), str(path)).returncode == 0
    triton = _cli("gen", "--target", "triton", "--out", str(tmp_path / "out2"), str(path))
    assert triton.returncode == 2 and f"{path}:11:3: error: type 'tl' clashes" in triton.stderr
    check = _cli("check", str(path))
    assert check.returncode == 2 and f"{path}:11:3: error: type 'tl' clashes" in check.stderr
    assert _cli("check", "--target", "torch", str(path)).returncode == 0


def test_check_rejects_a_field_named_like_what_the_generated_class_calls(tmp_path):
    path = tmp_path / "spec.vibee"
    path.write_text(edit(KV, "      usage: Float", "      field: Int\n      sizes: List<Int>"), encoding="utf-8")
    result = _cli("check", str(path))
    assert result.returncode == 2 and f"{path}:14:7: error: field 'field' of type 'MemoryStats'" in result.stderr, result.stderr


def test_two_specs_for_one_module_is_an_error(tmp_path):
    a, b = tmp_path / "a.vibee", tmp_path / "b.vibee"
    a.write_text(KV, encoding="utf-8")
    b.write_text(KV, encoding="utf-8")
    with pytest.raises(SpecError, match="module 'igla_kv_cache' is also generated by"):
        load_specs([a, b])


def test_descriptive_spec_generates_with_defaults_under_target(tmp_path):
    legacy = textwrap.dedent("""\
        name: igla_kv_cache
        version: "1.0.0"
        language: zig
        module: igla_kv_cache

        types:
          KVCache:
            fields:
              keys: List<Float>
              max_seq_len: Int

        behaviors:
          - name: cache_lookup
            given: Layer, position, and KV
            when: Attention computed
            then: Return cached KV or compute new

        test_cases:
          - name: test_kv_memory
            input: { layers: 32, heads: 32, dim: 128 }
            expected: { memory_gb: 2.0 }

        creation_pattern:
          source: AttentionLayer
          transformer: KVCacheWrapper
        """)
    path = tmp_path / "igla_kv_cache.vibee"
    path.write_text(legacy, encoding="utf-8")
    with pytest.raises(SpecError, match="unsupported language 'zig'"):
        load_specs([path])
    (spec,), warnings = load_specs([path], target="torch")
    assert spec.legacy and spec.target == "torch" and spec.kind == "kv_cache"
    assert spec.config.block_size == type(spec.config)().block_size  # defaults
    assert spec.extra == {"creation_pattern": {"source": "AttentionLayer", "transformer": "KVCacheWrapper"}}
    assert [c.name for c in spec.ignored_test_cases] == ["test_kv_memory"]
    assert not spec.behaviors[0].known
    messages = " | ".join(w.message for w in warnings)
    assert "creation_pattern" in messages and "cache_lookup" in messages and "test_kv_memory" in messages


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vibee", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_reports_errors_with_exit_2_and_no_traceback(tmp_path):
    path = tmp_path / "spec.vibee"
    path.write_text(edit(KV, "block_size: 16", "block_size: 24"), encoding="utf-8")
    for cmd in (["check"], ["gen", "--out", str(tmp_path / "out")], ["explain"]):
        result = _cli(*cmd, str(path))
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert f"{path}:7:15: error: block_size must be a power of two, got 24" in result.stderr
        assert "   7 |   block_size: 24" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing written on error


def test_cli_syntax_only_skips_semantic_checks(tmp_path):
    path = tmp_path / "spec.vibee"
    path.write_text(edit(KV, "block_size: 16", "block_size: 24"), encoding="utf-8")
    assert _cli("check", "--syntax-only", str(path)).returncode == 0
    path.write_text(edit(KV, 'version: "1.0.0"', 'version: "1.0.0'), encoding="utf-8")
    result = _cli("check", "--syntax-only", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr and ":2:" in result.stderr
