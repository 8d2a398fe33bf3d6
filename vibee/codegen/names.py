"""Names a spec puts into a generated module, checked against the names the rendered module binds.

A spec type becomes a module-level class and its fields class attributes. Nothing lists what
the templates import or define: the rendered module's own syntax tree says it, so a template
that starts importing `math` protects `math` without anyone updating a list."""

from __future__ import annotations

import ast
import builtins
from collections.abc import Iterator

from vibee.frontend.errors import Diagnostic
from vibee.ir.spec import Spec, TypeDecl


def _bound_at_top(body: list[ast.stmt]) -> Iterator[tuple[str, ast.AST]]:
    """(name, node) for every name a module's top level binds, in `if`/`try` blocks too."""
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                yield (alias.asname or alias.name.split(".")[0]), node
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.For, ast.With)):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            if isinstance(node, ast.With):
                targets = [item.optional_vars for item in node.items]
            for target in targets:
                for sub in ast.walk(target) if target is not None else ():
                    if isinstance(sub, ast.Name):
                        yield sub.id, node
        if isinstance(node, (ast.If, ast.Try, ast.For, ast.While, ast.With)):
            for block in ("body", "orelse", "finalbody"):
                yield from _bound_at_top(getattr(node, block, []))
            for handler in getattr(node, "handlers", []):
                yield from _bound_at_top(handler.body)


def _loaded(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _what(node: ast.AST, text: str) -> str:
    line = text.splitlines()[node.lineno - 1].strip()
    return f"`{line[:60]}`" + (" ..." if len(line) > 60 else "")


def clashes(spec: Spec, text: str, template: str) -> list[Diagnostic]:
    """Errors for spec types and fields whose names the generated module (text, rendered from
    template) also binds, or whose name hides a builtin the module uses."""
    tree = ast.parse(text)
    bindings: dict[str, list[ast.AST]] = {}
    for name, node in _bound_at_top(tree.body):
        bindings.setdefault(name, []).append(node)
    loaded = _loaded(tree)
    errors: list[Diagnostic] = []
    for t in spec.types:
        own = [n for n in bindings.get(t.name, []) if isinstance(n, ast.ClassDef) and n.lineno == _class_line(tree, t)]
        others = [n for n in bindings.get(t.name, []) if n not in own]
        if not own:
            continue  # this file does not define the spec's types
        if others:
            errors.append(Diagnostic(
                f"type '{t.name}' clashes with a name the generated {spec.kind} module binds: {_what(others[0], text)} ({template})",
                t.span, f"rename the type, e.g. '{t.name[:1].upper() + t.name[1:]}Record'"))
        elif (hasattr(builtins, t.name) or t.name.startswith("__")) and t.name in loaded:
            errors.append(Diagnostic(
                f"type '{t.name}' would hide Python's builtin '{t.name}', which the generated {spec.kind} module uses ({template})",
                t.span, f"rename the type, e.g. '{t.name[:1].upper() + t.name[1:]}Record'"))
        errors.extend(_field_clashes(t, own[0]))
    return errors


def _class_line(tree: ast.Module, t: TypeDecl) -> int | None:
    """The line of the dataclass rendered for spec type t: the one whose fields are t's."""
    fields = [f.name for f in t.fields]
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == t.name:
            declared = [s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
            if declared == fields and any(isinstance(d, ast.Name) and d.id == "dataclass" for d in node.decorator_list):
                return node.lineno
    return None


def _field_clashes(t: TypeDecl, cls: ast.ClassDef) -> list[Diagnostic]:
    """A field is a class attribute while the class body runs: one named like something the
    body's defaults call (`field(default_factory=list)`) would be called instead."""
    used = set().union(*(_loaded(s.value) for s in cls.body if isinstance(s, ast.AnnAssign) and s.value is not None))
    return [
        Diagnostic(f"field '{f.name}' of type '{t.name}' hides '{f.name}', which the generated class uses for its defaults",
                   f.span or t.span, f"rename the field, e.g. '{f.name}_value'")
        for f in t.fields if f.name in used
    ]
