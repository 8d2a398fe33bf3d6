"""From a parsed document to a validated Spec: every error the checks can find is collected with
its span, so one run of `vibee check` shows them all."""

from __future__ import annotations

import hashlib
import keyword
from typing import Any

from vibee.kinds.registry import KIND_NAMES, config_model
from vibee.ir.config_section import build_config
from vibee.ir.reading import (IDENT, Collector, canonical_keys, check_keys, expect_mapping, expect_sequence, is_dunder,
                              required_ident, scalar_str, span_of)
from vibee.ir.spec import SUPPORTED_TARGETS, Behavior, FieldDecl, KindConfig, Spec, TestCase, TypeDecl, Variant
from vibee.ir.types import TypeSyntaxError, normalize_type
from vibee.frontend.document import Mapping, Node, Scalar, Sequence, Span
from vibee.frontend.errors import Diagnostic, SpecError, did_you_mean, one_of

HEADER_KEYS = ("name", "version", "language", "module", "kind", "description")
SECTIONS = ("config", "variants", "types", "behaviors", "test_cases")
BEHAVIOR_KEYS = ("name", "given", "when", "then", "description", "params", "test_cases")
TEST_CASE_KEYS = ("name", "input", "expected", "behavior", "description")
VARIANT_KEYS = ("name", "description", "params", "score_mod", "mask_mod")
TYPE_KEYS = ("description", "fields")

def build_spec(doc: Mapping, path: str, text: str, target: str | None = None) -> tuple[Spec, list[Diagnostic]]:
    """Validate a document as a spec. Returns the Spec and its warnings; raises SpecError."""
    c = Collector()
    header = _header(doc, path, target, c)
    kind = header.get("kind")
    legacy = header.get("legacy", False)
    known = set(HEADER_KEYS) | set(SECTIONS)
    extra: dict[str, Any] = {}
    for key, value in doc:
        name = str(key.value)
        if name in known:
            continue
        hint = did_you_mean(name, known)
        if hint:  # a near miss of a known section is a typo, not an extra section
            c.error(key.span, f"unknown section '{name}'", hint)
        else:
            c.warn(key.span, f"section '{name}' is not used by the generator; it is kept in the IR")
            extra[name] = value.to_python()

    types = _types(doc, c)
    if kind is None:  # config, variants, behaviors and test cases all mean what the kind says
        raise SpecError(c.errors + c.warnings)
    config, config_spans = build_config(doc, kind, c)
    variants = _variants(doc, kind, c)
    ignored: list[TestCase] = []
    model = config_model(kind)  # its ClassVars, even if config failed
    declared = [v.name for v in variants]
    behaviors = _behaviors(doc, model, legacy, ignored, declared, c)
    cases = _test_cases(doc.get("test_cases"), None, model, legacy, ignored, declared, c)
    if c.errors:
        raise SpecError(c.errors + c.warnings)
    assert config is not None and kind is not None
    spec = Spec(
        path=path,
        source_hash=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        name=header["name"],
        version=header["version"],
        language=header["language"],
        target=header["target"],
        module=header["module"],
        kind=kind,
        description=header["description"],
        legacy=legacy,
        config=config,
        variants=variants,
        types=types,
        behaviors=behaviors,
        test_cases=cases,
        ignored_test_cases=ignored,
        extra=extra,
        config_spans=config_spans,
        span=doc.span,
    )
    return spec, c.warnings


# --- header -------------------------------------------------------------------------------------


def _header(doc: Mapping, path: str, target: str | None, c: Collector) -> dict[str, Any]:
    out: dict[str, Any] = {}
    name = scalar_str(doc.get("name"), "name", c, doc.span)
    if name is None and "name" not in doc:
        c.error(Span(path, 1, 1, 1, 2), "missing 'name' (the spec's name, e.g. igla_kv_cache)")
    out["name"] = name or ""
    out["version"] = scalar_str(doc.get("version"), "version", c, doc.span) or "0.0.0"
    out["description"] = scalar_str(doc.get("description"), "description", c, doc.span) or ""

    module_node = doc.get("module")
    module = scalar_str(module_node, "module", c, doc.span) or name or ""
    if module and not (IDENT.match(module) and not keyword.iskeyword(module) and not is_dunder(module)):
        c.error(span_of(module_node) or span_of(doc.get("name")), f"module '{module}' is not a valid Python module name",
                "use letters, digits and underscores, e.g. igla_kv_cache")
    out["module"] = module

    lang_node = doc.get("language")
    language = scalar_str(lang_node, "language", c, doc.span) or "torch"
    out["language"] = language
    out["legacy"] = language not in SUPPORTED_TARGETS
    if target is not None:
        out["target"] = target
        if out["legacy"]:
            c.warn(span_of(lang_node), f"language '{language}' is not a vibee target; generating for --target {target} with default configuration")
    elif out["legacy"]:
        c.error(span_of(lang_node), f"unsupported language '{language}'; vibee generates {' or '.join(SUPPORTED_TARGETS)}",
                "set `language: torch`, or pass --target torch to generate this spec with defaults")
        out["target"] = "torch"
    else:
        out["target"] = language

    kind_node = doc.get("kind")
    kind = scalar_str(kind_node, "kind", c, doc.span)
    if kind is None and kind_node is None:
        kind = _infer_kind(module) or _infer_kind(name or "")
        if kind is None:
            c.error(span_of(doc.get("name")) or doc.span, f"cannot tell the kind of spec '{name}'",
                    f"add `kind:` ({one_of(KIND_NAMES)}), or name the spec igla_<kind>")
    elif kind is not None and kind not in KIND_NAMES:
        c.error(span_of(kind_node), f"unknown kind '{kind}'", did_you_mean(kind, KIND_NAMES) or one_of(KIND_NAMES))
        kind = None
    out["kind"] = kind
    return out


def _infer_kind(name: str) -> str | None:
    for kind in sorted(KIND_NAMES, key=len, reverse=True):
        if name == kind or name.endswith("_" + kind):
            return kind
    return None


# --- variants -----------------------------------------------------------------------------------


def _variants(doc: Mapping, kind: str | None, c: Collector) -> list[Variant]:
    node = doc.get("variants")
    if node is None:
        return []
    if kind != "flash_attention":
        c.error(doc.key_node("variants").span, f"'variants' only apply to flash_attention specs, not {kind}")
        return []
    items = expect_sequence(node, "variants", c)
    from vibee.expr.language import compile_expr  # the expression language has its own grammar

    out: list[Variant] = []
    seen: dict[str, Span] = {}
    for item in items:
        m = expect_mapping(item, "a variant", c)
        if m is None:
            continue
        check_keys(m, VARIANT_KEYS, "variant", c)
        name = required_ident(m, "name", "variant", c)
        params = _params(m.get("params"), c)
        if name in seen:
            c.error(m.key_node("name").span, f"duplicate variant '{name}' (first defined at line {seen[name].line})")
        elif name:
            seen[name] = m.key_node("name").span
        exprs = {}
        for role in ("score_mod", "mask_mod"):
            e = m.get(role)
            if e is None:
                continue
            if not isinstance(e, Scalar) or not isinstance(e.value, str):
                c.error(span_of(e), f"{role} must be an expression string, e.g. \"score * 0.5\"")
                continue
            try:
                exprs[role] = compile_expr(e, role=role, params=params)
            except SpecError as exc:
                c.diagnostics.extend(exc.diagnostics)
        if "score_mod" not in m and "mask_mod" not in m:
            c.error(m.span, f"variant '{name}' needs a score_mod or a mask_mod expression")
        if name:
            out.append(Variant(name=name, params=params, span=m.span, **exprs))
    return out


def _params(node: Node | None, c: Collector) -> dict[str, Any]:
    if node is None:
        return {}
    if not isinstance(node, Mapping):
        c.error(span_of(node), "params must be a mapping of names to numbers, e.g. { window: 4096 }")
        return {}
    out = {}
    for k, v in node:
        if not IDENT.match(str(k.value)):
            c.error(k.span, f"parameter name '{k.value}' is not an identifier")
        elif not isinstance(v, Scalar) or not isinstance(v.value, (int, float, bool)) or v.quoted:
            c.error(span_of(v), f"parameter '{k.value}' must be a number or a boolean")
        else:
            out[str(k.value)] = v.value
    return out


# --- types --------------------------------------------------------------------------------------


def _types(doc: Mapping, c: Collector) -> list[TypeDecl]:
    node = doc.get("types")
    if node is None:
        return []
    if not isinstance(node, Mapping):
        c.error(span_of(node), "'types' must map type names to their fields", "e.g. types:\n    MemoryStats:\n      fields:\n        num_blocks: Int")
        return []
    declared = {str(k.value) for k, _ in node}
    out = []
    for key, body in node:
        tname = str(key.value)
        if not IDENT.match(tname) or keyword.iskeyword(tname) or is_dunder(tname):
            c.error(key.span, f"type name '{tname}' is not an identifier" + (" a spec may use (double underscores are Python's)" if is_dunder(tname) else ""))
            continue
        description = ""
        fields_node: Node | None = None
        if isinstance(body, Mapping):
            check_keys(body, TYPE_KEYS, f"type {tname}", c)
            description = str(body.get("description").value) if isinstance(body.get("description"), Scalar) else ""
            fields_node = body.get("fields")
        elif isinstance(body, Scalar) and body.value is None:
            fields_node = None
        else:
            c.error(span_of(body), f"type '{tname}' must have a 'fields:' mapping")
            continue
        out.append(TypeDecl(name=tname, description=description, fields=_fields(fields_node, tname, declared, c), span=key.span))
    return out


def _fields(node: Node | None, tname: str, declared: set[str], c: Collector) -> list[FieldDecl]:
    if node is None:
        return []
    pairs: list[tuple[Scalar, Node | None, str]] = []
    if isinstance(node, Mapping):  # fields: { name: Type } or { name: { type: T, description: d } }
        for k, v in node:
            if isinstance(v, Mapping):
                desc = v.get("description")
                pairs.append((k, v.get("type"), str(desc.value) if isinstance(desc, Scalar) else ""))
            else:
                pairs.append((k, v, ""))
    elif isinstance(node, Sequence):  # fields: [ - name: x  type: T ]
        for item in node:
            if isinstance(item, Mapping) and isinstance(item.get("name"), Scalar):
                desc = item.get("description")
                pairs.append((item.get("name"), item.get("type"), str(desc.value) if isinstance(desc, Scalar) else ""))
            else:
                c.error(span_of(item), f"a field of {tname} needs a name and a type")
    else:
        c.error(span_of(node), f"fields of {tname} must be a mapping of field names to types")
        return []
    out, seen = [], set()
    for key, tnode, desc in pairs:
        fname = str(key.value)
        if not IDENT.match(fname) or keyword.iskeyword(fname):
            c.error(key.span, f"field name '{fname}' of {tname} is not an identifier")
            continue
        if is_dunder(fname):
            c.error(key.span, f"field name '{fname}' is reserved: Python gives double-underscore names to the class itself",
                    f"rename the field, e.g. '{fname.strip('_')}'")
            continue
        if fname in seen:
            c.error(key.span, f"duplicate field '{fname}' in {tname}")
            continue
        seen.add(fname)
        if not isinstance(tnode, Scalar) or tnode.value is None:
            c.error(span_of(tnode) or key.span, f"field '{fname}' of {tname} needs a type", "e.g. Int, Float, List<Int>")
            continue
        try:
            ftype = normalize_type(str(tnode.value), declared)
        except TypeSyntaxError as exc:
            span = tnode.span
            col = span.col + (1 if tnode.quoted else 0) + exc.offset
            c.error(Span(span.path, span.line, col, span.line, col + 1), str(exc), exc.hint)
            continue
        out.append(FieldDecl(name=fname, type=ftype, description=desc, span=key.span))
    return out


# --- behaviors and test cases -------------------------------------------------------------------


def _behaviors(doc: Mapping, config: type[KindConfig] | None, legacy: bool, ignored: list[TestCase], variants: list[str],
               c: Collector) -> list[Behavior]:
    node = doc.get("behaviors")
    if node is None:
        return []
    known = config.BEHAVIORS if config is not None else {}
    out: list[Behavior] = []
    seen: dict[str, int] = {}
    for item in expect_sequence(node, "behaviors", c):
        m = canonical_keys(expect_mapping(item, "a behavior", c), BEHAVIOR_KEYS)
        if m is None:
            continue
        check_keys(m, BEHAVIOR_KEYS, "behavior", c)
        name_node = m.get("name")
        name = required_ident(m, "name", "behavior", c)
        if not name:
            continue
        if name in seen:
            c.error(name_node.span, f"duplicate behavior '{name}' (first defined at line {seen[name]})")
            continue
        seen[name] = name_node.span.line
        is_known = config is None or name in known
        if not is_known:
            hint = did_you_mean(name, known) or one_of(known)
            if legacy:
                c.warn(name_node.span, f"behavior '{name}' has no template in {config.KIND}; it is kept as documentation", hint)
            else:
                c.error(name_node.span, f"unknown behavior '{name}' for {config.KIND}", hint)
        texts = {}
        for key in ("given", "when", "then", "description"):
            v = m.get(key)
            if v is not None and not (isinstance(v, Scalar) and v.value is not None):
                c.error(span_of(v), f"'{key}' of behavior '{name}' must be text")
            texts[key] = str(v.value) if isinstance(v, Scalar) and v.value is not None else ""
        cases = _test_cases(m.get("test_cases"), name, config, legacy, ignored, variants, c)
        out.append(Behavior(name=name, given=texts["given"] or texts["description"], when=texts["when"], then=texts["then"],
                            params=m.get("params").to_python() if isinstance(m.get("params"), Mapping) else {},
                            test_cases=cases, known=is_known, span=m.span))
    return out


def _test_cases(node: Node | None, behavior: str | None, config: type[KindConfig] | None, legacy: bool,
                ignored: list[TestCase], variants: list[str], c: Collector) -> list[TestCase]:
    """Validated test cases; descriptive (legacy) cases the kind cannot check go to `ignored`."""
    if node is None:
        return []
    inputs = config.TEST_INPUT_KEYS if config is not None else frozenset()
    expects = config.TEST_EXPECTED_KEYS if config is not None else frozenset()
    cases = []
    seen: set[str] = set()
    for item in expect_sequence(node, "test_cases", c):
        m = canonical_keys(expect_mapping(item, "a test case", c), TEST_CASE_KEYS)
        if m is None:
            continue
        check_keys(m, TEST_CASE_KEYS, "test case", c)
        name_node = m.get("name")
        name = scalar_str(name_node, "name", c, m.span)
        if name is None:
            c.error(m.span, "a test case needs a 'name'")
            continue
        if name in seen:
            c.error(name_node.span, f"duplicate test case '{name}'")
        seen.add(name)
        sections = {}
        unknown = []
        for part, allowed in (("input", inputs), ("expected", expects)):
            sub = m.get(part)
            if sub is None:
                sections[part] = {}
                continue
            if not isinstance(sub, Mapping):
                c.error(span_of(sub), f"'{part}' of test case '{name}' must be a mapping, e.g. {{ seq_lens: [1, 17] }}")
                sections[part] = {}
                continue
            for k, _ in sub:
                if str(k.value) not in allowed:
                    unknown.append((k, part, allowed))
            if part == "input" and "variants" in allowed and sub.get("variants") is not None:
                _check_variant_names(sub.get("variants"), name, variants, c)
            sections[part] = sub.to_python()
        case = TestCase(name=name, input=sections["input"], expected=sections["expected"], behavior=behavior, span=m.span)
        if unknown and legacy:
            c.warn(unknown[0][0].span, f"test case '{name}' uses keys this kind cannot check ({', '.join(str(k.value) for k, _, _ in unknown)}); it is kept but not generated")
            ignored.append(case)
            continue
        for k, part, allowed in unknown:
            c.error(k.span, f"unknown {part} key '{k.value}' in test case '{name}'", did_you_mean(str(k.value), allowed) or (one_of(allowed) if allowed else None))
        if not sections["expected"] and not unknown and config is not None:
            c.error(m.span, f"test case '{name}' has no 'expected:'; every generated test checks something", one_of(expects) if expects else None)
        cases.append(case)
    return cases


def _check_variant_names(node: Node, case: str, declared: list[str], c: Collector) -> None:
    """A test case's `variants:` lists variants the spec declares (under `variants:`)."""
    if not isinstance(node, Sequence):
        c.error(span_of(node), f"'variants' of test case '{case}' must be a list of variant names, e.g. [{', '.join(declared[:2])}]")
        return
    for item in node.items:
        if not isinstance(item, Scalar) or not isinstance(item.value, str):
            c.error(span_of(item), f"'variants' of test case '{case}' must list variant names, got {item.to_python()!r}")
        elif item.value not in declared:
            hint = did_you_mean(item.value, declared) or (f"declared variants: {', '.join(declared)}" if declared else
                                                          "declare it under `variants:` with a score_mod or mask_mod")
            c.error(item.span, f"test case '{case}' uses variant '{item.value}', which the spec does not declare", hint)
