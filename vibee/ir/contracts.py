"""Contracts between specs generated together: values that must agree across modules.

Each check takes the specs by kind, runs only when the specs it relates are present, and reports
at the value to change. None is needed today: the attention page is the cache's block by
construction, and a spec describes no model, so what depends on the served model's shape (the
head dims attention is compiled for, quantization groups vs tensor-parallel shards) is checked
when the model is loaded."""

from __future__ import annotations

from typing import Callable

from vibee.frontend.errors import Diagnostic
from vibee.ir.spec import Spec

CHECKS: list[Callable[[dict[str, Spec]], list[Diagnostic]]] = []


def check_contracts(specs: list[Spec]) -> list[Diagnostic]:
    by_kind = {s.kind: s for s in specs}
    return [d for check in CHECKS for d in check(by_kind)]
