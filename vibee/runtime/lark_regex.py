"""A Lark grammar whose language is regular, written as one regex (so that it decodes from a token
DFA on the device, token_dfa.py): every rule and terminal a rule uses is put in its place, and the
EBNF operators (`*`, `+`, `?`, `[...]`, `~ n..m`) become the regex's own. A rule that refers to
itself (directly or through others) only at the end or the start of its alternatives, `x: a x | b`
or `x: x c | b` or both, is solved as `a* b c*` (Arden's lemma: the grammar's language, not an
approximation): lists written recursively decode on the device. `%ignore`d terminals may stand
before each token of a rule and after the last (never inside a terminal), as Lark's lexer skips
them. What a regex can't say the same way (templates, a grammar that is one literal flagged other
than case-insensitive) or Lark can't read (llguidance's extensions: `%json`, `&`, `~` on terminals,
special tokens) stays with llguidance.

A rule nested inside itself (`x: "(" x ")" | "a"`, and through other rules: `value: "[" value
("," value)* "]" | NUMBER`) is not regular. It is unrolled NESTING levels deep (level 0 takes the
rule's alternatives that need no nesting, level k+1 the rule with level k in each place it names
itself): the grammar's language up to that depth, exactly, and no deeper. That language is built as
a DAG (each level shared by the next, not copied) and made a DFA level by level with interegular's
operations (lark_fsm), each level reduced, since one regex of it would double in size at each level
where the rule is named twice. One bracket type grows the DFA by a few states a level; several
(JSON's arrays in objects in arrays...) multiply it, and a grammar whose DFA passes
MAX_NESTED_STATES goes to its token pushdown automaton (lark_rtn.py, lark_pda.py) where it has one,
else to llguidance (exactly, at any depth).

The regex stands for the grammar's language as a context-free grammar (Lark's Earley parser
accepts exactly it); llguidance's lexer takes the longest terminal at each point, which refuses
a few strings of grammars whose terminals overlap (`("a" | "aa") "ab"` on "aab")."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any


# How deep a rule nested inside itself is unrolled (the device's language: that deep, no deeper), and
# the most states a level's DFA may have (several bracket types multiply the states at each level).
NESTING = 16
MAX_NESTED_STATES = 2048

# device_pattern's key for a grammar whose rules nest: (NESTED_LARK, its text), compiled by lark_fsm.
NESTED_LARK = "nested_lark"

# Longer grammar texts stay with llguidance: they would be parsed on the engine's loop and kept as
# cache keys (a request body may hold 16 MB); grammars written for decoding are a few KB.
MAX_LARK_CHARS = 20_000


class _NotRegular(Exception):
    pass


# What a grammar this module can't take raises: not regular, llguidance's dialect, or an error
# llguidance reports with its caret (a Lark whose internals differ: AttributeError; an %import of
# a grammar file Lark can't find: OSError).
_REFUSED = (_NotRegular, ValueError, TypeError, KeyError, AttributeError, AssertionError, OSError)


def lark_regex(text: str) -> str | None:
    """The regex of Lark grammar `text` (its `start` rule), or None when it has none here (a rule
    nested inside itself included)."""
    return _regex(_start(text, nesting=0))


@functools.lru_cache(maxsize=64)
def lark_pattern(text: str) -> str | tuple[str, str] | None:
    """What the device constrains Lark grammar `text` with: its regex, (NESTED_LARK, text) when its
    rules nest (lark_fsm unrolls and compiles it, on the engine's compile thread), or None
    (llguidance). The engine asks on its loop for each request: one level of nesting tells, and
    the answer is kept per grammar."""
    if len(text) > MAX_LARK_CHARS:
        return None
    tree = _start(text, nesting=1)
    return (NESTED_LARK, text) if tree is not None and _has(tree, "nested") else _regex(tree)


def lark_fsm(text: str, nesting: int = NESTING) -> Any:
    """interegular's DFA of Lark grammar `text`, its rules nested up to `nesting` deep, or None
    (not a grammar here, or a level of it past its share of MAX_NESTED_STATES)."""
    from lark.exceptions import LarkError

    tree = _start(text, nesting)
    try:
        return _fsm(tree, {}).reduce() if tree is not None else None
    except (LarkError, *_REFUSED):
        return None


def _regex(tree: Any) -> str | None:
    """The regex of a tree with no nesting in it (None for None, or what a regex can't say)."""
    from lark.exceptions import LarkError
    from lark.load_grammar import PrepareLiterals, TerminalTreeToPattern

    if tree is None:
        return None
    try:
        return _flagged(TerminalTreeToPattern().transform(PrepareLiterals().transform(copy.deepcopy(tree))))
    except (LarkError, *_REFUSED):
        return None


def _start(text: str, nesting: int) -> Any:
    """The tree of `text`'s start rule, every rule and terminal in its place (a DAG where rules
    nest), or None."""
    from lark.exceptions import LarkError
    from lark.load_grammar import GrammarBuilder

    # GrammarBuilder's definitions are Lark's internals (as Lark 1.3 has them): a Lark whose
    # internals differ leaves every grammar to llguidance (AttributeError) rather than err.
    builder = GrammarBuilder()
    try:
        builder.load_grammar(text, "<grammar>")
        definitions = _json_strings(builder._definitions)
        if "start" not in definitions or any(d.params for d in definitions.values()):
            return None
        ignored = _ignored(definitions, builder._ignore_names)
        tree = _inlined(definitions, "start", (), ignored, nesting)
        if ignored is not None:  # ignored text after the last token too
            tree = _sequence([tree, copy.deepcopy(ignored)])
        return tree
    except (LarkError, *_REFUSED):
        return None


# Lark's common.ESCAPED_STRING ends its body with a lookbehind, /(?<!\\)(\\\\)*?/, which no DFA has: it is
# read as the JSON string it stands for: no unescaped quote or newline inside, a backslash escapes one
# character (Lark's regex also takes `"a"b"` as one string, which no JSON writer means).
_LOOKBEHIND_STRING = ("/.*?/", "/(?<!\\\\)(\\\\\\\\)*?/")
_JSON_STRING = 'S: "\\"" /(?:[^"\\\\\\n]|\\\\.)*/ "\\""\n'


def _json_strings(definitions: dict[str, Any]) -> dict[str, Any]:
    """definitions with each terminal that is Lark's common.ESCAPED_STRING (under any name) as a JSON string."""
    from lark import Token
    from lark.load_grammar import GrammarBuilder

    for definition in definitions.values():
        tree = definition.tree
        if not definition.is_term or tree is None:
            continue
        regexps = [t for t in tree.scan_values(lambda v: isinstance(v, Token) and v.type == "REGEXP")]
        if tuple(regexps) == _LOOKBEHIND_STRING:
            builder = GrammarBuilder()
            builder.load_grammar(_JSON_STRING, "<json string>")
            definition.tree = builder._definitions["S"].tree
    return definitions


def _flagged(pattern: Any) -> str | None:
    """A Lark pattern as a regex: a flagged pattern alone (inside others Lark already writes its flags
    inline) keeps case-insensitive, a flag interegular reads; the others stay with llguidance."""
    if not pattern.flags:
        return pattern.to_regexp()
    return f"(?i:{pattern.to_regexp()})" if set(pattern.flags) == {"i"} else None


def _ignored(definitions: dict[str, Any], names: list[str]) -> Any:
    """`(I1 | I2 | ...)*` of the terminals %ignore names (None: none): what may stand before each
    token of a rule."""
    from lark import Token, Tree

    if not names:
        return None
    either = _alternatives([_inlined(definitions, name, (), None, 0) for name in names])
    return Tree("expr", [either, Token("OP", "*")])


def _inlined(definitions: dict[str, Any], name: str, stack: tuple[str, ...], ignored: Any, nesting: int) -> Any:
    """A copy of rule or terminal `name`'s tree with every rule and terminal it names in its place;
    a reference to `name` itself is solved here (_solved), one to a rule it is inside of is left
    for that rule to solve. In a rule, each token (a terminal or a literal) follows `ignored`
    (%ignore's text, if any); inside a terminal nothing is ignored."""
    def place(named: str) -> tuple[Any, bool] | None:
        if named == name or named in stack:
            return None
        return _inlined(definitions, named, (*stack, name), ignored, nesting), definitions[named].is_term

    return _solved(_placed(definitions, name, ignored, place), name, nesting)


def _placed(definitions: dict[str, Any], name: str, ignored: Any,
            place: Callable[[str], tuple[Any, bool] | None]) -> Any:
    """A copy of `name`'s tree with each rule or terminal it names put as place(that name) says:
    (its tree, whether it is a token) or None (left as it is). In a rule, each token (a terminal, a
    literal or one place() calls a token) follows `ignored`; `a b -> alias` is `a b`; templates
    are refused."""
    from lark import Tree
    from lark.grammar import Symbol

    definition = definitions.get(name)
    if definition is None or definition.tree is None:
        raise _NotRegular(f"{name} is declared, not defined")
    in_rule = ignored is not None and not definition.is_term
    tree = copy.deepcopy(definition.tree)
    todo = [tree]
    while todo:
        node = todo.pop()
        for i, child in enumerate(node.children):
            if isinstance(child, Symbol):
                placed = place(child.name)
                if placed is not None:
                    subtree, token = placed
                    node.children[i] = _sequence([copy.deepcopy(ignored), subtree]) if in_rule and token else subtree
            elif isinstance(child, Tree):
                if child.data == "alias":  # `a b -> name`: a name for the tree, not a change to the language
                    child = node.children[i] = child.children[0]
                elif child.data == "template_usage":
                    raise _NotRegular("templates")
                if in_rule and child.data in ("literal", "range"):  # an anonymous token
                    node.children[i] = _sequence([copy.deepcopy(ignored), child])
                else:
                    todo.append(child)
    return tree


def _mentions(tree: Any, name: str, seen: dict[int, bool] | None = None) -> bool:
    """Whether tree (a DAG where rules nest: each node looked at once) refers to rule `name`."""
    from lark import Tree
    from lark.grammar import Symbol

    if isinstance(tree, Symbol):
        return tree.name == name
    if not isinstance(tree, Tree):
        return False
    seen = {} if seen is None else seen
    if id(tree) not in seen:
        seen[id(tree)] = any(_mentions(child, name, seen) for child in tree.children)
    return seen[id(tree)]


def _has(tree: Any, data: str, seen: dict[int, bool] | None = None) -> bool:
    """Whether tree has a node `data` (a DAG: each node looked at once)."""
    from lark import Tree

    if not isinstance(tree, Tree):
        return False
    seen = {} if seen is None else seen
    if id(tree) not in seen:
        seen[id(tree)] = tree.data == data or any(_has(child, data, seen) for child in tree.children)
    return seen[id(tree)]


def _solved(tree: Any, name: str, nesting: int) -> Any:
    """The language of `name: tree` without `name` in it. Each alternative that refers to name at
    its end (A name) or its start (name C), or not at all (B), makes name A* B C* (Arden's lemma,
    both ways). Where name is also (or only) nested inside an alternative, A, B or C still name it,
    and that is unrolled `nesting` levels deep (_unrolled); _NotRegular at nesting 0."""
    from lark import Token, Tree

    if not _mentions(tree, name):
        return tree
    before, rest, after = [], [], []
    for alternative in tree.children if tree.data == "expansions" else [tree]:
        split = None
        for nested in (False, True):  # at an end with name nowhere else first
            for at_end, repeated in ((True, before), (False, after)):
                try:
                    split = (repeated, *_split(alternative, name, at_end, nested))
                    break
                except _NotRegular:
                    continue
            if split is not None:
                break
        if split is None:  # name only inside it (in brackets, in a repetition): unrolled whole
            rest.append(alternative)
        else:
            split[0].append(split[1])
            rest.append(split[2])
    core = _alternatives(rest)
    if core is None:
        raise _NotRegular(f"{name} never ends (every alternative refers to it again)")
    heads, tails = _alternatives(before), _alternatives(after)
    items = [Tree("expr", [heads, Token("OP", "*")])] if heads is not None else []
    items.append(core)
    if tails is not None:
        items.append(Tree("expr", [tails, Token("OP", "*")]))
    solved = _sequence(items)
    if not _mentions(solved, name):
        return solved
    if nesting == 0:
        raise _NotRegular(f"{name} inside itself")
    return _unrolled(solved, name, nesting)


def _unrolled(tree: Any, name: str, nesting: int) -> Any:
    """`name: tree` nested at most `nesting` deep: level 0 is tree without the alternatives that
    name it, level k+1 tree with level k for name. Each level is a node `nested` [tree, k] that
    the next one shares (not a copy), so the DAG grows by one tree a level."""
    from lark import Tree

    mentions: dict[int, bool] = {}  # which nodes of tree name `name`: the same at every level
    level = _substituted(tree, name, None, {}, mentions)
    if level is None:
        raise _NotRegular(f"{name} never ends (every alternative refers to it again)")
    level = Tree("nested", [level, 0])
    for k in range(1, nesting + 1):
        level = Tree("nested", [_substituted(tree, name, level, {}, mentions), k])
    return level


def _substituted(tree: Any, name: str, by: Any, done: dict[int, Any], mentions: dict[int, bool]) -> Any:
    """tree with `by` in each place that names `name` (by None: the empty language, and then None
    for a tree that has no string left). Parts that do not name it are shared, not copied.
    mentions: _mentions' memo of tree's nodes."""
    from lark import Tree
    from lark.grammar import Symbol

    if isinstance(tree, Symbol) and tree.name == name:
        return by
    if not isinstance(tree, Tree) or not _mentions(tree, name, mentions):
        return tree
    if id(tree) in done:
        return done[id(tree)]
    children = [_substituted(child, name, by, done, mentions) for child in tree.children]
    data, first = tree.data, children[0] if children else None
    if data == "expansions":
        out = _alternatives(children)
    elif data == "expansion" or data in ("value", "nested"):
        out = None if any(c is None for c in children) else Tree(data, children)
    elif data == "maybe" or data == "expr" and len(children) == 2 and children[1] in ("?", "*"):
        out = Tree(data, children) if first is not None else _sequence([])
    elif data == "expr" and first is None:  # x+ or x ~ n..m of nothing: nothing, or the empty string at n = 0
        out = _sequence([]) if children[1] == "~" and int(children[2]) == 0 else None
    elif data == "expr":
        out = Tree(data, children)
    else:
        raise _NotRegular(f"{name} inside {data}")
    done[id(tree)] = out
    return out


def _sequence(items: list[Any]) -> Any:
    from lark import Tree

    return Tree("expansion", items)


def _alternatives(options: list[Any]) -> Any:
    """`a | b | ...` of the options that are there (None: the empty language, no string)."""
    from lark import Tree

    present = [o for o in options if o is not None]
    return Tree("expansions", present) if present else None


def _split(tree: Any, name: str, at_end: bool, nested: bool) -> tuple[Any, Any]:
    """(A, B) with tree's language = A name | B (at_end) or name A | B, name in neither (with
    `nested`: name may stand inside A or B too, in the other items of a sequence); None for a part
    with no strings. _NotRegular where name is anywhere but that end."""
    from lark.grammar import Symbol

    if not _mentions(tree, name):
        return None, tree
    if isinstance(tree, Symbol):  # name itself: the empty string before (or after) it
        return _sequence([]), None
    if tree.data == "expansions":
        parts = [_split(child, name, at_end, nested) for child in tree.children]
        return _alternatives([a for a, _ in parts]), _alternatives([b for _, b in parts])
    if tree.data == "expansion":
        items = list(tree.children)
        end, others = (items[-1], items[:-1]) if at_end else (items[0], items[1:])
        if not nested and any(_mentions(item, name) for item in others):
            raise _NotRegular(f"{name} inside itself")
        a, b = _split(end, name, at_end, nested)

        def around(part):  # a copy of the other items each time: a tree must not hold one node twice
            rest = copy.deepcopy(others)
            return None if part is None else _sequence(rest + [part] if at_end else [part] + rest)
        return around(a), around(b)
    if tree.data == "value":
        return _split(tree.children[0], name, at_end, nested)
    optional = tree.data == "maybe" or tree.data == "expr" and len(tree.children) == 2 and tree.children[1] == "?"
    if optional:  # [x] and x?: x or nothing
        a, b = _split(tree.children[0], name, at_end, nested)
        return a, _alternatives([b, _sequence([])])
    raise _NotRegular(f"{name} repeated ({tree.data})")


def _regex_fsm(regex: str) -> Any:
    """interegular's FSM of a regex; _NotRegular where interegular can't make one (a lookaround)."""
    import interegular

    try:
        return interegular.parse_pattern(regex).to_fsm()
    except Exception as exc:  # noqa: BLE001 - interegular's errors have no common base
        raise _NotRegular(f"interegular: {exc}") from None


def _fsm(tree: Any, done: dict[int, Any]) -> Any:
    """interegular's FSM of a tree (a DAG where rules nest, each node made once): a part with no
    nesting in it through its regex, as lark_regex writes it; the rest with FSM operations, each
    level reduced and held to MAX_NESTED_STATES."""
    from interegular.fsm import FSM, epsilon

    if id(tree) in done:
        return done[id(tree)]
    if not _has(tree, "nested"):
        regex = _regex(tree)
        if regex is None:
            raise _NotRegular("a part with no regex")
        made = _regex_fsm(regex)
    else:
        data, children = tree.data, tree.children
        if data == "nested":  # level k may have (k + 1) / (NESTING + 1) of the states: a DFA that
            # grows by more than that share a level (several bracket types) stops early, not at the cap
            made = _fsm(children[0], done).reduce()
            level = children[1]
            if len(made.states) > MAX_NESTED_STATES * (level + 1) // (NESTING + 1):
                raise _NotRegular(f"level {level} has {len(made.states)} states, more than its share of {MAX_NESTED_STATES}")
        elif data == "expansion":
            made = FSM.concatenate(*(_fsm(child, done) for child in children))
        elif data == "expansions":
            made = FSM.union(*(_fsm(child, done) for child in children))
        elif data == "value":
            made = _fsm(children[0], done)
        else:
            inner = _fsm(children[0], done)
            op = "?" if data == "maybe" else children[1]
            maybe = FSM.union(inner, epsilon(inner.alphabet))
            if op == "?":
                made = maybe
            elif op == "*":
                made = inner.star()
            elif op == "+":
                made = FSM.concatenate(inner, inner.star())
            elif op == "~":  # n, or n..m: n times, then up to m - n times more
                low = int(children[2])
                high = int(children[3]) if len(children) > 3 else low
                if high < low:
                    raise _NotRegular("a bad range")
                made = FSM.concatenate(inner.times(low), maybe.times(high - low))
            else:
                raise _NotRegular(f"an operator {op}")
    done[id(tree)] = made
    return made
