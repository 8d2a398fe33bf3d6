"""The expression language of attention variants: checking, error positions, and the three
lowerings (torch evaluated with real tensors, Triton run under the interpreter, numpy evaluated
for the reference oracle)."""

from __future__ import annotations

import ast
import io
import json
import math
import os
import subprocess
import sys
import tokenize

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from vibee.ir.spec import Expr
from vibee.frontend.document import Scalar, Span
from vibee.frontend.errors import SpecError
from vibee.expr.language import CONTEXT_VARS, FUNCTIONS, compile_expr

PATH = "specs/tri/igla_flash_attention.vibee"
LINE, COL = 31, 15  # where the scalar starts in the (imaginary) spec file


def scalar(source, *, quoted=True, line=LINE, col=COL, path=PATH) -> Scalar:
    width = len(str(source)) + (2 if quoted else 0)
    return Scalar(source, Span(path, line, col, line, col + width), quoted=quoted)


def compile_ok(source: str, role="score_mod", params=None, quoted=True) -> Expr:
    return compile_expr(scalar(source, quoted=quoted), role=role, params=params or {})


def diagnostics(source, role="score_mod", params=None, quoted=True):
    with pytest.raises(SpecError) as caught:
        compile_expr(scalar(source, quoted=quoted), role=role, params=params or {})
    return caught.value.diagnostics


# ---------------------------------------------------------------------------------------------
# torch lowering, evaluated with broadcasting tensors

B, H, Q, K = 2, 4, 5, 7


def alibi_slope(h, num_heads):
    """What the generated module provides: the standard ALiBi slope 2 ** (-8 (h + 1) / n)."""
    return torch.exp2(-8.0 * (h + 1) / num_heads)


def context() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "score": torch.randn(B, H, Q, K, generator=gen) * 20.0,
        "b": torch.arange(B).view(B, 1, 1, 1),
        "h": torch.arange(H).view(1, H, 1, 1),
        "q_idx": torch.arange(Q).view(1, 1, Q, 1),
        "kv_idx": torch.arange(K).view(1, 1, 1, K),
    }


# No builtins but __import__: the lowering calls none, but torch's C++ code imports modules lazily
# (on the first as_tensor, the first float64 comparison ...) through the calling frame's builtins.
EVAL_BUILTINS = {"__builtins__": {"__import__": __import__}}


def eval_torch(expr: Expr, ctx: dict, num_heads: int = H):
    namespace = {"torch": torch, "alibi_slope": alibi_slope, "num_heads": num_heads, **ctx}
    return eval(expr.torch, EVAL_BUILTINS, namespace)


def _alibi_by_hand(c):
    # Slopes listed per head the way the ALiBi paper does for 4 heads: 1/4, 1/16, 1/64, 1/256.
    slopes = torch.tensor([1 / 4, 1 / 16, 1 / 64, 1 / 256]).view(1, H, 1, 1)
    return c["score"] - slopes * (c["q_idx"] - c["kv_idx"])


VALID = [
    ("cap * tanh(score / cap)", "score_mod", {"cap": 30.0},
     lambda c: 30.0 * torch.tanh(c["score"] / 30.0)),
    ("q_idx - kv_idx < window", "mask_mod", {"window": 3},
     lambda c: (c["q_idx"] - c["kv_idx"]) < 3),
    ("q_idx >= kv_idx and q_idx - kv_idx < window", "mask_mod", {"window": 2},
     lambda c: torch.logical_and(c["q_idx"] >= c["kv_idx"], c["q_idx"] - c["kv_idx"] < 2)),
    ("score - alibi_slope(h) * (q_idx - kv_idx)", "score_mod", {}, _alibi_by_hand),
    ("where(q_idx > kv_idx, score, score * 0.5)", "score_mod", {},
     lambda c: torch.where(c["q_idx"] > c["kv_idx"], c["score"], c["score"] / 2)),
    ("not (kv_idx > q_idx)", "mask_mod", {}, lambda c: c["kv_idx"] <= c["q_idx"]),
    ("max(score, -5.0)", "score_mod", {}, lambda c: c["score"].clamp(min=-5.0)),
]


def eval_numpy(expr: Expr, ctx: dict, num_heads: int = H):
    arrays = {name: value.numpy() for name, value in ctx.items()}
    namespace = {"np": np, "alibi_slope": lambda h, n: np.exp2(-8.0 * (h + 1) / n), "num_heads": num_heads, **arrays}
    return eval(expr.numpy, EVAL_BUILTINS, namespace)


@pytest.mark.parametrize("source, role, params, by_hand", VALID, ids=[v[0] for v in VALID])
def test_numpy_lowering_for_the_reference_computes_what_the_expression_says(source, role, params, by_hand):
    ctx = context()
    got = torch.from_numpy(np.broadcast_to(eval_numpy(compile_ok(source, role, params), ctx), (B, H, Q, K)).copy())
    want = by_hand(ctx).expand(B, H, Q, K)
    if role == "mask_mod":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got.float(), want)


def test_numpy_lowering_shares_no_operator_text_with_the_torch_lowering():
    expr = compile_ok("where(not q_idx < kv_idx and h >= 1, tanh(score / 2) - abs(q_idx), sigmoid(-score))")
    assert expr.numpy == ("np.where(np.logical_and(np.logical_not(np.less(q_idx, kv_idx)), np.greater_equal(h, 1)), "
                          "np.subtract(np.tanh(np.true_divide(score, 2)), np.absolute(q_idx)), "
                          "np.exp(np.negative(np.logaddexp(0.0, np.negative(np.negative(score))))))")
    assert "torch" not in expr.numpy and "np." not in expr.torch


@pytest.mark.parametrize("source, role, params, by_hand", VALID, ids=[v[0] for v in VALID])
def test_torch_lowering_computes_what_the_expression_says(source, role, params, by_hand):
    ctx = context()
    got = eval_torch(compile_ok(source, role, params), ctx)
    want = by_hand(ctx)
    shape = (B, H, Q, K)
    assert got.dtype == (torch.bool if role == "mask_mod" else torch.float32)
    torch.testing.assert_close(got.expand(shape), want.expand(shape))


def test_lowering_is_fully_parenthesised_with_params_inlined():
    expr = compile_ok("cap * tanh(score / cap) + bias", params={"cap": 30.0, "bias": -1})
    assert expr.torch == "((30.0 * torch.tanh((score / 30.0))) + (-1))"
    assert expr.triton == "((30.0 * ((2.0 * tl.sigmoid((2.0 * (score / 30.0)))) - 1.0)) + (-1))"
    assert expr.source == "cap * tanh(score / cap) + bias"
    assert expr.span == scalar("cap * tanh(score / cap) + bias").span


def test_a_param_changes_the_lowered_constant_not_a_name():
    narrow = compile_ok("q_idx - kv_idx < window", "mask_mod", {"window": 1})
    wide = compile_ok("q_idx - kv_idx < window", "mask_mod", {"window": 4})
    assert "window" not in narrow.torch + narrow.triton
    assert int(eval_torch(narrow, context()).sum()) < int(eval_torch(wide, context()).sum())


@pytest.mark.parametrize("source, params, torch_text", [
    ("score * exp(0)", {}, "(score * 1.0)"),
    ("score + 2 * 3", {}, "(score + 6)"),
    ("score / (cap / 2)", {"cap": 8.0}, "(score / 4.0)"),
    ("score * tanh(cap)", {"cap": 0.0}, "(score * 0.0)"),
    ("where(flag, score, 0.0)", {"flag": True}, "score"),
    ("where(flag, score, 0.0) + score", {"flag": False}, "(0.0 + score)"),
    ("where(flag, q_idx, 0.5) + score", {"flag": True}, "((q_idx * 1.0) + score)"),
    ("score * -(-2)", {}, "(score * 2)"),
])
def test_constant_subexpressions_are_folded_to_numbers(source, params, torch_text):
    assert compile_ok(source, params=params).torch == torch_text


@pytest.mark.parametrize("source, params", [
    ("q_idx >= kv_idx and enabled", {"enabled": True}),
    ("q_idx >= kv_idx or disabled", {"disabled": False}),
    ("not disabled and q_idx >= kv_idx", {"disabled": False}),
])
def test_boolean_params_fold_away_instead_of_reaching_bitwise_operators(source, params):
    expr = compile_ok(source, "mask_mod", params)
    assert expr.torch == "(q_idx >= kv_idx)"
    ctx = context()
    assert torch.equal(eval_torch(expr, ctx), ctx["q_idx"] >= ctx["kv_idx"])


def test_constants_passed_to_torch_functions_become_tensors():
    ctx = context()
    got = eval_torch(compile_ok("score * alibi_slope(2) + min(1, q_idx)"), ctx)
    want = ctx["score"] * 2.0 ** -6 + torch.clamp(ctx["q_idx"], max=1)
    torch.testing.assert_close(got, want)


def test_int_arithmetic_stays_int_and_division_gives_float():
    ctx = context()
    assert eval_torch(compile_ok("q_idx - kv_idx"), ctx).dtype == torch.int64
    assert eval_torch(compile_ok("(q_idx - kv_idx) / 2"), ctx).dtype == torch.float32
    assert eval_torch(compile_ok("abs(q_idx - kv_idx)"), ctx).dtype == torch.int64


# ---------------------------------------------------------------------------------------------
# Triton lowering, under the interpreter in a fresh process (TRITON_INTERPRET must be set before
# triton is imported, which other test files in the same session may already have done)

TRITON_CASES = VALID + [
    ("score + sqrt(abs(q_idx - kv_idx))", "score_mod", {}, None),
    ("where(flag, q_idx, 0.5) - score", "score_mod", {"flag": True}, None),
    ("min(score, 2) + exp(-abs(q_idx - kv_idx)) + sigmoid(score)", "score_mod", {}, None),
    ("b == 1 or h != 2 and not q_idx < kv_idx", "mask_mod", {}, None),
]

_TRITON_SCRIPT = '''
import importlib.util, json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
import triton
import triton.language as tl

cases = json.loads(open(sys.argv[1]).read())
B, H, Q, K = 2, 4, 4, 8
score = torch.randn(B, H, Q, K, generator=torch.Generator().manual_seed(1)) * 20.0
ctx = {"score": score, "b": torch.arange(B).view(B, 1, 1, 1), "h": torch.arange(H).view(1, H, 1, 1),
       "q_idx": torch.arange(Q).view(1, 1, Q, 1), "kv_idx": torch.arange(K).view(1, 1, 1, K)}
alibi = lambda h, num_heads: torch.exp2(-8.0 * (h + 1) / num_heads)
namespace = {"torch": torch, "alibi_slope": alibi, "num_heads": H, **ctx}
# __import__ only: torch's C++ code imports lazily through the calling frame's builtins.
only_import = {"__builtins__": {"__import__": __import__}}
wants = [eval(case["torch"], only_import, namespace).expand(B, H, Q, K).to(torch.float32) for case in cases]
kernel_source = """
import triton
import triton.language as tl

@triton.jit
def alibi_slope(h, num_heads):
    return tl.exp2(-8.0 * (h + 1) / num_heads)
"""
for i, case in enumerate(cases):
    kernel_source += f"""
@triton.jit
def kernel_{i}(score_ptr, out_ptr, num_heads, H: tl.constexpr, Q: tl.constexpr, K: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    q_idx = tl.arange(0, Q)[:, None]
    kv_idx = tl.arange(0, K)[None, :]
    offsets = pid * Q * K + q_idx * K + kv_idx
    score = tl.load(score_ptr + offsets)
    result = {case["triton"]}
    tl.store(out_ptr + offsets, result.to(tl.float32) + tl.zeros((Q, K), tl.float32))
"""
module_path = os.path.join(os.path.dirname(sys.argv[1]), "variant_kernels.py")
open(module_path, "w").write(kernel_source)
spec = importlib.util.spec_from_file_location("variant_kernels", module_path)
kernels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernels)

report = []
for i, want in enumerate(wants):
    out = torch.empty(B, H, Q, K)
    getattr(kernels, f"kernel_{i}")[(B * H,)](score, out, H, H=H, Q=Q, K=K)
    report.append({"max_abs_diff": (out - want).abs().max().item(),
                   "max_abs": want.abs().max().item(), "distinct": len(torch.unique(want))})
print(json.dumps(report))
'''


@pytest.fixture(scope="module")
def triton_report(tmp_path_factory):
    pytest.importorskip("triton")
    folder = tmp_path_factory.mktemp("triton_expr")
    lowered = [compile_ok(src, role, params) for src, role, params, _ in TRITON_CASES]
    (folder / "cases.json").write_text(json.dumps([{"torch": e.torch, "triton": e.triton} for e in lowered]))
    (folder / "run.py").write_text(_TRITON_SCRIPT)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(folder / "run.py"), str(folder / "cases.json")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("index", range(len(TRITON_CASES)), ids=[c[0] for c in TRITON_CASES])
def test_triton_lowering_matches_torch_lowering_under_the_interpreter(triton_report, index):
    result = triton_report[index]
    assert result["distinct"] > 1  # the case exercises more than one value
    assert result["max_abs_diff"] <= 1e-5 * max(1.0, result["max_abs"])


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


# ---------------------------------------------------------------------------------------------
# the language means what Python means for the same text

def _python_sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


PYTHON_MEANING = {"tanh": math.tanh, "sigmoid": _python_sigmoid, "abs": abs, "min": min, "max": max,
                  "where": lambda c, a, b: a if c else b}

_LEAVES = ["score", "q_idx", "kv_idx", "h", "b", "cap", "0", "3", "7", "0.5", "2.25", "1e-1", "3."]


@st.composite
def source_texts(draw, kind: str, depth: int = 0) -> str:
    """Expression text of the given kind ("number" or "bool"), built by pasting text together
    without adding parentheses, so the parser's precedence decides how it groups."""
    deeper = depth + 1
    if kind == "bool":
        form = draw(st.sampled_from(["compare"] if depth >= 3 else ["compare", "logic", "not", "paren"]))
        if form == "compare":
            compare = st.sampled_from(["<", "<=", ">", ">=", "==", "!="])
            return " ".join([draw(source_texts("number", deeper)), draw(compare), draw(source_texts("number", deeper))])
        if form == "logic":
            return " ".join([draw(source_texts("bool", deeper)), draw(st.sampled_from(["and", "or"])),
                             draw(source_texts("bool", deeper))])
        inner = draw(source_texts("bool", deeper))
        return f"not {inner}" if form == "not" else f"({inner})"
    if depth >= 3 or draw(st.integers(0, 2)) == 0:
        return draw(st.sampled_from(_LEAVES))
    form = draw(st.sampled_from(["arith", "arith", "grouped", "grouped", "divide", "neg", "unary_fn", "binary_fn",
                                 "where"]))
    if form in ("arith", "grouped"):
        text = " ".join([draw(source_texts("number", deeper)), draw(st.sampled_from(["+", "-", "*"])),
                         draw(source_texts("number", deeper))])
        return f"({text})" if form == "grouped" else text
    if form == "divide":  # by a non-zero constant only: Python raises where torch gives inf
        return f"{draw(source_texts('number', deeper))} / {draw(st.sampled_from(['2', '0.5', '4.0']))}"
    if form == "neg":
        return "-" + draw(source_texts("number", deeper))
    if form == "unary_fn":
        return f"{draw(st.sampled_from(['tanh', 'abs', 'sigmoid']))}({draw(source_texts('number', deeper))})"
    if form == "binary_fn":
        a, b = draw(source_texts("number", deeper)), draw(source_texts("number", deeper))
        return f"{draw(st.sampled_from(['min', 'max']))}({a}, {b})"
    c, a, b = (draw(source_texts(k, deeper)) for k in ("bool", "number", "number"))
    return f"where({c}, {a}, {b})"


def assert_means_what_python_means(source: str, values: dict) -> None:
    params = {"cap": 1.5}
    want = eval(source, {"__builtins__": {}}, {**PYTHON_MEANING, **params, **values})  # plain Python
    role = "mask_mod" if isinstance(want, bool) else "score_mod"
    try:
        expr = compile_ok(source, role, params)
    except SpecError as err:
        assume("constant" not in str(err))  # an expression without context variables is rejected
        raise
    tensors = {k: torch.tensor(v, dtype=torch.float64 if k == "score" else torch.int64) for k, v in values.items()}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # tanh(q_idx) and as_tensor(0.5) compute in float64, as Python does
    try:
        got = eval_torch(expr, tensors)
    finally:
        torch.set_default_dtype(previous)
    arrays = {k: np.asarray(v, dtype=np.float64 if k == "score" else np.int64) for k, v in values.items()}
    reference = eval(expr.numpy, EVAL_BUILTINS, {"np": np, **arrays})
    if role == "mask_mod":
        assert bool(got) == want, expr.torch
        assert bool(reference) == want, expr.numpy
    else:
        assert math.isclose(float(got), want, rel_tol=1e-9, abs_tol=1e-12), expr.torch
        assert math.isclose(float(reference), want, rel_tol=1e-9, abs_tol=1e-12), expr.numpy


@pytest.mark.parametrize("source", [
    "score - (q_idx - kv_idx)",
    "score - q_idx - kv_idx",
    "2 * (score + 1)",
    "score / 2 / 4",
    "-score * 3 + -(q_idx - 7)",
    "score - -q_idx * 2",
    "(score + 1) * (score - 1) / (cap + 1)",
    "not q_idx < kv_idx or h == 1 and b == 0",
    "not (q_idx < kv_idx or h == 1) and b == 0",
    "q_idx - 1 >= kv_idx + 1",
    "where(not score > 0 and q_idx > 1, -score, score * 2) - 1",
    "max(min(score, 1), -1) * cap",
])
def test_grouping_and_precedence_are_pythons(source):
    assert_means_what_python_means(source, {"score": -2.5, "q_idx": 3, "kv_idx": 1, "h": 1, "b": 0})


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(source=source_texts("number") | source_texts("bool"), score=st.floats(-4, 4), q=st.integers(0, 5),
       kv=st.integers(0, 5))
def test_random_expressions_mean_what_python_means_for_the_same_text(source, score, q, kv):
    assert_means_what_python_means(source, {"score": score, "q_idx": q, "kv_idx": kv, "h": 1, "b": 0})


def test_every_function_lowers_to_torch_that_runs_on_broadcast_tensors():
    for name, fn in FUNCTIONS.items():
        args = ", ".join(["q_idx > 0" if kind == "bool" else "h" for kind in fn.args])
        expr = compile_ok(f"score + {name}({args})")
        assert eval_torch(expr, context()).shape == (B, H, Q, K), name
