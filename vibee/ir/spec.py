"""The typed IR of one spec: header, config (one model per kind), variants, types, behaviors and
test cases. Every node keeps the span it came from so validation errors can point at it."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny

from vibee.frontend.document import Span

SUPPORTED_TARGETS = ("torch", "triton")

# When a knob takes effect. "compile": the generator specializes on it (a constexpr, a code
# shape), so a new value is a new generated module. "runtime": the generated code takes it as an
# argument, so a new value (a spec edit or a serve flag) needs no generation at all.
Stage = Literal["compile", "runtime"]


def knob(stage: Stage, default: Any = ..., *, description: str, flag: str | None = None,
         aliases: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """A config field of a kind, tagged with its stage. `flag` names the serve/bench option that
    sets it (vLLM's spelling, e.g. "--block-size"); `aliases` are further spellings. The option,
    its help text and its validation all come from this one declaration."""
    extra: dict[str, Any] = {"stage": stage}
    if flag:
        extra["flag"] = flag
        extra["aliases"] = list(aliases)
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


class IRNode(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    span: Span | None = Field(default=None, exclude=True, repr=False)


class KindConfig(BaseModel):
    """Base of the per-kind config models (vibee/ir/<kind>.py). Defaults live only there.

    A subclass sets:
      KIND: the kind's name ("kv_cache", ...)
      BEHAVIORS: the operations its templates know, name -> one-line description
      TEST_INPUT_KEYS / TEST_EXPECTED_KEYS: the keys a test case's `input` / `expected` may use
    and may override `derived(shape)` (figures for `vibee explain`, for a model shape).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    KIND: ClassVar[str] = ""
    BEHAVIORS: ClassVar[dict[str, str]] = {}
    TEST_INPUT_KEYS: ClassVar[frozenset[str]] = frozenset()
    TEST_EXPECTED_KEYS: ClassVar[frozenset[str]] = frozenset()

    def derived(self, shape) -> dict[str, str]:
        """Figures derived from the resolved config for a model shape (a
        vibee.runtime.model_config.ModelConfig), shown by `vibee explain`."""
        return {}

    @classmethod
    def stage_of(cls, name: str) -> Stage:
        extra = cls.model_fields[name].json_schema_extra
        if not isinstance(extra, dict) or "stage" not in extra:
            raise TypeError(f"{cls.__name__}.{name} is declared without knob(stage, ...)")
        return extra["stage"]

    @classmethod
    def fields_at(cls, stage: Stage) -> tuple[str, ...]:
        return tuple(name for name in cls.model_fields if cls.stage_of(name) == stage)


class FieldDecl(IRNode):
    name: str
    type: str  # the spec's spelling, normalised: Int, Float, Bool, String, Tensor, List<T>, Option<T>, Map<K,V>, or a declared type
    description: str = ""


class TypeDecl(IRNode):
    name: str
    description: str = ""
    fields: list[FieldDecl] = []


class TestCase(IRNode):
    name: str
    input: dict[str, Any] = {}
    expected: dict[str, Any] = {}
    behavior: str | None = None


class Behavior(IRNode):
    name: str
    given: str = ""
    when: str = ""
    then: str = ""
    params: dict[str, Any] = {}
    test_cases: list[TestCase] = []
    known: bool = True  # False only for descriptive (legacy) specs whose behavior has no template


class Expr(IRNode):
    """A checked spec expression and its lowerings. Only these strings reach generated code."""

    source: str
    torch: str
    triton: str
    numpy: str  # the reference oracle's lowering, written apart from the torch one (vibee/expr/lower_numpy.py)


class Variant(IRNode):
    name: str
    params: dict[str, float | int | bool] = {}
    score_mod: Expr | None = None
    mask_mod: Expr | None = None


class Spec(IRNode):
    path: str
    source_hash: str
    name: str
    version: str = "0.0.0"
    language: str  # as written in the spec
    target: str  # what gets generated: language, or --target
    module: str
    kind: str
    description: str = ""
    legacy: bool = False  # a descriptive spec generated with defaults (language not a target)
    config: SerializeAsAny[KindConfig]
    variants: list[Variant] = []
    types: list[TypeDecl] = []
    behaviors: list[Behavior] = []
    test_cases: list[TestCase] = []
    ignored_test_cases: list[TestCase] = []  # descriptive cases with no executable meaning
    extra: dict[str, Any] = {}  # sections the generator does not know, kept as data
    # Where each config value was written ("prefill.block_m" -> span), for cross-module errors.
    config_spans: dict[str, Span] = Field(default={}, exclude=True, repr=False)

    def all_test_cases(self) -> list[TestCase]:
        """Top-level cases plus those declared under behaviors, in spec order."""
        cases = list(self.test_cases)
        for b in self.behaviors:
            cases.extend(b.test_cases)
        return cases

    def behavior(self, name: str) -> Behavior | None:
        return next((b for b in self.behaviors if b.name == name), None)
