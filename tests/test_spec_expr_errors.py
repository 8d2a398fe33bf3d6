"""Checking of the attention-variant expression language: error messages, hints and exact
columns inside the expression, and that nothing hostile from a spec becomes code."""

from __future__ import annotations

import ast
import io
import tokenize

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spec_expressions import COL, LINE, PATH, compile_ok, diagnostics, scalar
from vibee.frontend.errors import SpecError
from vibee.expr.language import CONTEXT_VARS, FUNCTIONS, compile_expr


# ---------------------------------------------------------------------------------------------
# errors: message, hint and the exact column inside the expression


def col_of(source: str, at, quoted=True) -> int:
    offset = at if isinstance(at, int) else source.index(at)
    return COL + (1 if quoted else 0) + offset


ERRORS = [
    # source, role, params, where the first diagnostic points, message part, hint part
    ("score.__class__", "score_mod", {}, ".__class__", "attribute access is not allowed", None),
    ('__import__("os").system("true")', "score_mod", {}, "__import__", "'__import__' is not an allowed function",
     "expected one of: abs"),
    ("scroe * 2", "score_mod", {}, "scroe", "unknown name 'scroe'", "did you mean 'score'?"),
    ("foo(score)", "score_mod", {}, "foo", "'foo' is not an allowed function", "expected one of: abs, alibi_slope"),
    ("score +", "score_mod", {}, 7, "ends too early", "expected one of: '(', '-', a name, a number"),
    ('"abc"', "score_mod", {}, '"abc"', "strings are not allowed", None),
    ("score[0]", "score_mod", {}, "[", "no subscripts", None),
    ("lambda: 1", "score_mod", {}, "lambda", "'lambda' is a Python keyword", None),
    ("score ** 2", "score_mod", {}, "**", "'**' is not supported", "x * x"),
    ("score * 2", "mask_mod", {}, 0, "mask_mod must be a boolean expression, got float", None),
    ("q_idx > kv_idx", "score_mod", {}, 0, "score_mod must be a number, got bool", "where("),
    ("window and score", "mask_mod", {"window": 8}, "window", "'and' needs booleans, got int", None),
    ("tanh(score, 1)", "score_mod", {}, "tanh", "tanh() takes 1 argument, got 2", "tanh(number)"),
    ("1 / 0 + score", "score_mod", {}, "0", "division by zero", None),
    ("score / (cap - 30.0)", "score_mod", {"cap": 30.0}, "cap - 30.0", "division by zero", None),
    ("", "score_mod", {}, 0, "score_mod is empty", "cap * tanh"),
    ("   ", "mask_mod", {}, 0, "mask_mod is empty", "q_idx >= kv_idx"),
    ("q_idx <", "mask_mod", {}, 7, "ends too early", "a name"),
    ("(tanh)(score)", "score_mod", {}, "(score", "only functions can be called", None),
    ("score(1)", "score_mod", {}, "score", "'score' is not an allowed function", None),
    ("tanh(x=score)", "score_mod", {}, "=", "'=' is not allowed", "positional arguments"),
    ("score // 2", "score_mod", {}, "//", "'//' is not supported", None),
    ("q_idx < kv_idx < 4", "mask_mod", {}, "< 4", "comparisons cannot be chained", None),
    ("score * * 2", "score_mod", {}, "* 2", "unexpected '*'", "expected one of"),
    ("score 2", "score_mod", {}, "2", "unexpected number '2'", "expected one of"),
    ("tanh + score", "score_mod", {}, "tanh", "'tanh' is a function", None),
    ("q_idx & kv_idx", "mask_mod", {}, "&", "unexpected character '&'", "'and', 'or', 'not'"),
    ("!q_idx", "mask_mod", {}, "!", "'!' is not allowed", "use 'not'"),
    ("alibi_slope(score)", "score_mod", {}, "score", "argument 1 of alibi_slope() must be an int, got float", None),
    ("where(score, 1, 2)", "score_mod", {}, "score", "argument 1 of where() must be a boolean, got float", None),
    ("-(q_idx > 0)", "score_mod", {}, "q_idx > 0", "unary '-' needs a number, got bool", None),
    ("(q_idx > 0) < 1", "mask_mod", {}, "q_idx > 0", "'<' needs numbers, got bool", None),
    ("score + exp(1000)", "score_mod", {}, "exp", "no finite value", None),
    ("score * log(zero)", "score_mod", {"zero": 0.0}, "log", "no finite value", None),
    ("score + 1e999", "score_mod", {}, "1e999", "evaluates to inf", None),
    ("score + 9223372036854775808", "score_mod", {}, "9223", "does not fit in 64 bits", None),
    ("score + " + "9" * 5000, "score_mod", {}, "9", "does not fit in 64 bits", None),
    ("score * 2", "score_mod", {"score": 1.0}, "score", "both a context variable and a param", "rename"),
    ("score * cap", "score_mod", {"cap": "30"}, "cap", "param 'cap' must be a number or a boolean, got str", None),
    ("where(flag, score, 1.0)", "score_mod", {"flag": False}, 0, "score_mod is the constant 1.0", None),
    ("True", "mask_mod", {}, "True", "'True' is a Python keyword", "no boolean literals"),
    ("score if 1 else 0", "score_mod", {}, "if", "'if' is a Python keyword", None),
    ("score # comment", "score_mod", {}, "#", "unexpected character '#'", None),
]


@pytest.mark.parametrize("source, role, params, at, message, hint", ERRORS, ids=[e[0][:40] or "<empty>" for e in ERRORS])
def test_error_points_into_the_expression(source, role, params, at, message, hint):
    first = diagnostics(source, role, params)[0]
    assert message in first.message
    assert (first.span.path, first.span.line, first.span.col) == (PATH, LINE, col_of(source, at))
    if hint is not None:
        assert first.hint is not None and hint in first.hint


def test_unquoted_scalar_columns_start_at_the_scalar():
    (diag,) = diagnostics("score * scroe", quoted=False)
    assert diag.span.col == COL + len("score * ")
    assert diag.span.end_col == diag.span.col + len("scroe")


def test_each_independent_problem_gets_its_own_diagnostic():
    diags = diagnostics("tahn(scroe) + kv_ix * foo(1)", params={"cap": 1.0})
    found = [(d.span.col - COL - 1, d.message, d.hint) for d in diags]
    assert found == [
        (0, "'tahn' is not an allowed function", "did you mean 'tanh'?"),
        (5, "unknown name 'scroe'", "did you mean 'score'?"),
        (14, "unknown name 'kv_ix'", "did you mean 'kv_idx'?"),
        (22, "'foo' is not an allowed function", "expected one of: " + ", ".join(sorted(FUNCTIONS))),
    ]


def test_hostile_call_reports_the_call_and_every_string():
    source = '__import__("os").system("true")'
    diags = diagnostics(source)
    assert [(d.span.col, d.message.split(" (")[0]) for d in diags] == [
        (col_of(source, "__import__"), "'__import__' is not an allowed function"),
        (col_of(source, '"os"'), "strings are not allowed in expressions"),
        (col_of(source, ".system"), "attribute access is not allowed"),
        (col_of(source, '"true"'), "strings are not allowed in expressions"),
    ]


def test_unknown_name_hint_lists_params_when_nothing_is_close():
    (diag,) = diagnostics("score * zzz", params={"cap": 2.0})
    assert diag.hint == "known names: score, b, h, q_idx, kv_idx, cap"


def test_misspelt_param_is_suggested():
    (diag,) = diagnostics("q_idx - kv_idx < windw", "mask_mod", {"window": 8})
    assert diag.hint == "did you mean 'window'?"


def test_errors_on_a_later_line_of_a_block_scalar_count_lines_from_the_scalar():
    (diag,) = diagnostics("score *\n  scroe", quoted=False)
    assert (diag.span.line, diag.span.col) == (LINE + 1, 3)


def test_rendered_error_shows_a_caret_under_the_bad_token():
    from vibee.frontend.errors import register_source

    path = "caret_check.vibee"
    register_source(path, "\n" * (LINE - 1) + " " * (COL - 1) + '"score * scroe"\n')
    with pytest.raises(SpecError) as caught:
        compile_expr(scalar("score * scroe", path=path), role="score_mod", params={})
    lines = caught.value.render().splitlines()
    assert lines[0] == f"{path}:{LINE}:{COL + 9}: error: unknown name 'scroe'"
    caret_line = lines[2]
    assert caret_line.index("^") - caret_line.index("|") - 2 == COL + 8
    assert caret_line.count("^") == len("scroe")


@pytest.mark.parametrize("source", ["-" * 150 + "score", "score" + " + score" * 150, "tanh(" * 150 + "score" + ")" * 150])
def test_deep_nesting_is_an_error_not_a_crash(source):
    (diag,) = diagnostics(source, quoted=False)
    assert "levels deep; the limit is 100" in diag.message and diag.span.col == COL


def test_nesting_within_the_limit_compiles():
    assert compile_ok("tanh(" * 90 + "score" + ")" * 90).torch.count("torch.tanh") == 90


def test_unknown_role_is_a_programming_error():
    with pytest.raises(ValueError, match="role"):
        compile_expr(scalar("score"), role="bias_mod", params={})


# ---------------------------------------------------------------------------------------------
# nothing from a spec becomes code

FORBIDDEN_IN_OUTPUT = ("__", "import", "eval", "exec", "os.", "getattr")

HOSTILE = [
    '__import__("os").system("true")',
    "score.__class__",
    "score.__class__.__bases__[0].__subclasses__()",
    "__builtins__",
    "eval(score)",
    'exec("import os")',
    "getattr(score, 'x')",
    "os.system",
    "import os",
    "lambda: 0",
    "(lambda: 0)()",
    "score if q_idx else 0",
    "[c for c in score]",
    "globals()",
    'open("/etc/passwd")',
    "tanh(score); import os",
    "score\nimport os",
    'f"{score}"',
    "score @ score",
    "{**score}",
    "tanh(*score)",
    "score.real",
    "(score).__add__(1)",
    "tanh.__globals__",
    "\\x5f_import__",
    "scoreimport",
]


@pytest.mark.parametrize("source", HOSTILE)
@pytest.mark.parametrize("role", ["score_mod", "mask_mod"])
def test_hostile_inputs_are_spec_errors(source, role):
    with pytest.raises(SpecError):
        compile_ok(source, role)


def test_params_named_like_code_are_inlined_as_values():
    params = {"evaluate": 1.5, "executor": 2, "imports": 3.0, "osx": 0.5, "getattribute": 4}
    expr = compile_ok("score * evaluate + executor - imports * osx + getattribute", params=params)
    for text in (expr.torch, expr.triton, expr.numpy):
        assert not any(bad in text for bad in FORBIDDEN_IN_OUTPUT), text


SAFE_NAMES = {"torch", "tl", "as_tensor", "to", "float32", "num_heads", "alibi_slope", "minimum", "maximum",
              "where", "tanh", "exp", "log", "sqrt", "abs", "sigmoid", *CONTEXT_VARS,
              "np", "add", "subtract", "multiply", "true_divide", "negative", "absolute", "logaddexp", "asarray",
              "float64", "less", "less_equal", "greater", "greater_equal", "equal", "not_equal", "logical_and",
              "logical_or", "logical_not"}
FUZZ_WORDS = ["score", "q_idx", "kv_idx", "h", "cap", "(", ")", ",", "+", "-", "*", "/", "<", "==", "and", "or",
              "not", "tanh", "where", "max", "alibi_slope", "1", "2.5", "1e-3", "__import__", "'os'", '"x"', ".",
              "system", "[", "]", "**", "lambda", ":", "=", "eval", "exec", "getattr", "os", "import", "__class__"]


def names_in(code: str) -> set[str]:
    return {t.string for t in tokenize.generate_tokens(io.StringIO(code).readline) if t.type == tokenize.NAME}


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(words=st.lists(st.sampled_from(FUZZ_WORDS), min_size=1, max_size=12), glue=st.sampled_from([" ", ""]),
       role=st.sampled_from(["score_mod", "mask_mod"]))
def test_any_token_soup_is_an_error_or_safe_code(words, glue, role):
    try:
        expr = compile_ok(glue.join(words), role, {"cap": 2.0})
    except SpecError:
        return
    for code in (expr.torch, expr.triton, expr.numpy):
        ast.parse(code, mode="eval")
        assert names_in(code) <= SAFE_NAMES, code
        assert not any(bad in code for bad in FORBIDDEN_IN_OUTPUT), code
