"""The three lowerings of the attention-variant expression language (torch evaluated with real
tensors, Triton run under the interpreter, numpy evaluated for the reference oracle), and that the
language means what Python means for the same text."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from spec_expressions import B, EVAL_BUILTINS, H, K, Q, compile_ok, context, eval_torch, scalar
from vibee.ir.spec import Expr
from vibee.frontend.errors import SpecError
from vibee.expr.language import FUNCTIONS


# ---------------------------------------------------------------------------------------------
# torch lowering, evaluated with broadcasting tensors

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
