"""Every generated module the runtime imports provides what its kind's Protocol
(vibee/kinds/<kind>/interface.py) declares: each name exists, as a constant, a class or a
callable that accepts the arguments the runtime passes. A template that drops or reshapes a name
the runtime uses fails here, on a CPU, before any engine runs."""

from __future__ import annotations

import inspect
import typing
from dataclasses import fields
from types import ModuleType
from typing import Any, Protocol

import pytest

from vibee.kinds.registry import KIND_NAMES
from vibee.runtime.generated import GeneratedModules, KindConfigs, load_generated

_PROTOCOL_BASES = {object, Protocol, typing.Generic}


def _is_protocol(tp: Any) -> bool:
    return inspect.isclass(tp) and getattr(tp, "_is_protocol", False)


def _members(proto: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """(annotated attributes, methods and properties) a Protocol declares, its bases' included."""
    hints = typing.get_type_hints(proto)
    methods: dict[str, Any] = {}
    for cls in reversed(proto.__mro__):
        if cls in _PROTOCOL_BASES:
            continue
        for name, value in vars(cls).items():
            if not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, property)):
                methods[name] = value
    return {n: t for n, t in hints.items() if not n.startswith("_")}, methods


def _call_problem(declared, actual, name: str, bound: bool) -> str | None:
    """Whether `actual` accepts every call the declaration allows: all its parameters, and only its
    required ones (the runtime may leave out those declared with a default)."""
    try:
        have = inspect.signature(actual)
    except (TypeError, ValueError):
        return None  # a builtin without a signature: callable is all we can tell
    params = list(inspect.signature(declared).parameters.values())[1:]  # the Protocol's self
    if not bound:  # a method looked up on a class: it takes the instance first
        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY), *params]
    for only_required in (False, True):
        args, kwargs = [], {}
        for p in params:
            if only_required and p.default is not inspect.Parameter.empty:
                continue
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                args.append(None)
            elif p.kind is p.KEYWORD_ONLY:
                kwargs[p.name] = None
        try:
            have.bind(*args, **kwargs)
        except TypeError as exc:
            what = "its required arguments" if only_required else "every declared argument"
            return f"{name}{have} does not accept {what} of {name}{inspect.signature(declared)}: {exc}"
    return None


def protocol_problems(obj: Any, proto: type, where: str) -> list[str]:
    """What obj lacks of proto. A method must be callable with the declared arguments; when obj's
    member is a class and the declaration returns a Protocol, the class's own methods are checked
    against that Protocol too. An annotated name is a constant of that type (or, annotated with a
    Protocol, an object checked against it)."""
    attributes, methods = _members(proto)
    if inspect.isclass(obj):
        attributes = {}  # a class's instance attributes are set by __init__: not visible until one is made
    problems = []
    for name, tp in attributes.items():
        if not hasattr(obj, name):
            problems.append(f"{where}: no {name} (declared {tp!r})")
            continue
        value = getattr(obj, name)
        if _is_protocol(tp):
            problems += protocol_problems(value, tp, f"{where}.{name}")
        elif inspect.isroutine(value):
            problems.append(f"{where}.{name} is a function; the runtime reads it as a constant")
        elif inspect.isclass(typing.get_origin(tp) or tp) and tp is not Any:
            if not isinstance(value, typing.get_origin(tp) or tp):
                problems.append(f"{where}.{name} is {value!r}, not a {tp!r}")
    for name, declared in methods.items():
        if not hasattr(obj, name):
            problems.append(f"{where}: no {name}")
            continue
        value = inspect.getattr_static(obj, name) if inspect.isclass(obj) else getattr(obj, name)
        if isinstance(declared, property):
            continue  # present is all a property promises
        if not callable(value) and not isinstance(value, (staticmethod, classmethod)):
            problems.append(f"{where}.{name} is not callable")
            continue
        target = getattr(obj, name)
        # A method of a class (not a module's function, not a static/class method) takes self first.
        bound = not inspect.isclass(obj) or isinstance(value, (staticmethod, classmethod))
        problem = _call_problem(declared, target, f"{where}.{name}", bound)
        if problem:
            problems.append(problem)
        returned = typing.get_type_hints(declared).get("return")
        if inspect.isclass(target) and _is_protocol(returned):
            problems += protocol_problems(target, returned, f"{where}.{name}()")
    return problems


def _declared_modules() -> dict[str, type]:
    hints = typing.get_type_hints(GeneratedModules)
    return {f.name: hints[f.name] for f in fields(GeneratedModules) if _is_protocol(hints[f.name])}


def test_generated_modules_hold_every_kind_of_the_registry_typed_by_its_protocol():
    declared = _declared_modules()
    assert set(KIND_NAMES) <= set(declared)
    for kind in KIND_NAMES:
        assert declared[kind].__module__ == f"vibee.kinds.{kind}.interface"
    assert [f.name for f in fields(KindConfigs)] == list(KIND_NAMES)


@pytest.mark.parametrize("target", [None, "torch"])
def test_each_generated_module_satisfies_its_protocol(target, tmp_path, monkeypatch):
    monkeypatch.setenv("VIBEE_CACHE_DIR", str(tmp_path))
    gen = load_generated(target=target)
    problems = [p for name, proto in _declared_modules().items()
                for p in protocol_problems(getattr(gen, name), proto, name)]
    assert problems == []


def _copy_without(module: Any, name: str, **replace: Any) -> ModuleType:
    copy = ModuleType(f"{module.__name__}_copy")
    copy.__dict__.update({k: v for k, v in vars(module).items() if k != name})
    copy.__dict__.update(replace)
    return copy


def test_a_module_missing_a_name_the_runtime_uses_fails_the_check():
    from vibee.kinds.flash_attention.interface import FlashAttentionModule

    fa = load_generated().flash_attention
    assert any("no paged_decode" in p for p in protocol_problems(_copy_without(fa, "paged_decode"), FlashAttentionModule, "fa"))


def test_a_function_that_lost_an_argument_fails_the_check():
    from vibee.kinds.kv_cache.interface import KVCacheModule

    kv = load_generated().kv_cache

    class BlockManager(kv.BlockManager):  # enable_prefix_caching no longer accepted
        def __init__(self, num_blocks, block_size):
            super().__init__(num_blocks, block_size)

    problems = protocol_problems(_copy_without(kv, "BlockManager", BlockManager=BlockManager), KVCacheModule, "kv")
    assert any("BlockManager" in p and "accept" in p for p in problems)


def test_a_class_missing_a_method_of_its_returned_protocol_fails_the_check():
    from vibee.kinds.continuous_batch.interface import ContinuousBatchModule

    cb = load_generated().continuous_batch
    Scheduler = type("Scheduler", (cb.Scheduler,), {"measured_stats": None})
    problems = protocol_problems(_copy_without(cb, "Scheduler", Scheduler=Scheduler), ContinuousBatchModule, "cb")
    assert any("measured_stats is not callable" in p for p in problems)


def test_a_constant_that_became_a_function_fails_the_check():
    from vibee.kinds.quantization.interface import QuantizationModule

    q = load_generated().quantization
    problems = protocol_problems(_copy_without(q, "BITS", BITS=lambda: 4), QuantizationModule, "q")
    assert problems == ["q.BITS is a function; the runtime reads it as a constant"]
