"""A Lark grammar whose language is regular, written as one regex (so that it decodes from a token
DFA on the device, token_dfa.py): every rule and terminal a rule uses is put in its place, and the
EBNF operators (`*`, `+`, `?`, `[...]`, `~ n..m`) become the regex's own. A rule that refers to
itself (directly or through others) only at the end or the start of its alternatives, `x: a x | b`
or `x: x c | b` or both, is solved as `a* b c*` (Arden's lemma: the grammar's language, not an
approximation): lists written recursively decode on the device. `%ignore`d terminals may stand
before each token of a rule and after the last (never inside a terminal), as Lark's lexer skips
them. Recursion anywhere else (a rule nested inside itself, `"(" x ")"`, or at both ends of one
alternative), or what a regex can't say the same way (templates, a grammar that is one literal
flagged other than case-insensitive) or Lark can't read (llguidance's extensions: `%json`, `&`,
`~` on terminals, special tokens) has no regex here and stays with llguidance.

The regex stands for the grammar's language as a context-free grammar (Lark's Earley parser
accepts exactly it); llguidance's lexer takes the longest terminal at each point, which refuses
a few strings of grammars whose terminals overlap (`("a" | "aa") "ab"` on "aab")."""

from __future__ import annotations

import copy
from typing import Any


class _NotRegular(Exception):
    pass


def lark_regex(text: str) -> str | None:
    """The regex of Lark grammar `text` (its `start` rule), or None when it has none here."""
    from lark.exceptions import LarkError
    from lark.load_grammar import GrammarBuilder, PrepareLiterals, TerminalTreeToPattern

    # GrammarBuilder's definitions are Lark's internals (as Lark 1.3 has them): a Lark whose
    # internals differ leaves every grammar to llguidance (AttributeError below) rather than err.
    builder = GrammarBuilder()
    try:
        builder.load_grammar(text, "<grammar>")
        definitions = builder._definitions
        if "start" not in definitions or any(d.params for d in definitions.values()):
            return None
        ignored = _ignored(definitions, builder._ignore_names)
        tree = _inlined(definitions, "start", (), ignored)
        if ignored is not None:  # ignored text after the last token too
            tree = _sequence([tree, copy.deepcopy(ignored)])
        pattern = TerminalTreeToPattern().transform(PrepareLiterals().transform(tree))
    except (_NotRegular, LarkError, ValueError, TypeError, KeyError, AttributeError, AssertionError):
        return None  # not regular, llguidance's dialect, or an error llguidance reports with its caret
    if not pattern.flags:
        return pattern.to_regexp()
    # A flagged pattern alone (inside others Lark already writes its flags inline): case-insensitive
    # is a flag token_dfa's regex parser (interegular) reads; the others stay with llguidance.
    return f"(?i:{pattern.to_regexp()})" if set(pattern.flags) == {"i"} else None


def _ignored(definitions: dict[str, Any], names: list[str]) -> Any:
    """`(I1 | I2 | ...)*` of the terminals %ignore names (None: none): what may stand before each
    token of a rule."""
    from lark import Token, Tree

    if not names:
        return None
    either = _alternatives([_inlined(definitions, name, (), None) for name in names])
    return Tree("expr", [either, Token("OP", "*")])


def _inlined(definitions: dict[str, Any], name: str, stack: tuple[str, ...], ignored: Any) -> Any:
    """A copy of rule or terminal `name`'s tree with every rule and terminal it names in its place;
    a reference to `name` itself is solved here (_solved), one to a rule it is inside of is left
    for that rule to solve. In a rule, each token (a terminal or a literal) follows `ignored`
    (%ignore's text, if any); inside a terminal nothing is ignored."""
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
                if child.name != name and child.name not in stack:
                    inlined = _inlined(definitions, child.name, (*stack, name), ignored)
                    token = in_rule and definitions[child.name].is_term
                    node.children[i] = _sequence([copy.deepcopy(ignored), inlined]) if token else inlined
            elif isinstance(child, Tree):
                if child.data == "alias":  # `a b -> name`: a name for the tree, not a change to the language
                    child = node.children[i] = child.children[0]
                elif child.data == "template_usage":
                    raise _NotRegular("templates")
                if in_rule and child.data in ("literal", "range"):  # an anonymous token
                    node.children[i] = _sequence([copy.deepcopy(ignored), child])
                else:
                    todo.append(child)
    return _solved(tree, name)


def _mentions(tree: Any, name: str) -> bool:
    from lark import Tree
    from lark.grammar import Symbol

    if isinstance(tree, Symbol):
        return tree.name == name
    return isinstance(tree, Tree) and any(_mentions(child, name) for child in tree.children)


def _solved(tree: Any, name: str) -> Any:
    """The language of `name: tree` without `name` in it: each alternative refers to name at most
    at its end (A name), or at its start (name C), or not at all (B), and then name is A* B C*
    (Arden's lemma, both ways); _NotRegular where name is inside an alternative otherwise."""
    from lark import Token, Tree

    if not _mentions(tree, name):
        return tree
    before, rest, after = [], [], []
    for alternative in tree.children if tree.data == "expansions" else [tree]:
        for at_end, repeated in ((True, before), (False, after)):
            try:
                a, b = _split(alternative, name, at_end)
            except _NotRegular:
                continue
            repeated.append(a)
            rest.append(b)
            break
        else:
            raise _NotRegular(f"{name} refers to itself other than at one end of an alternative")
    core = _alternatives(rest)
    if core is None:
        raise _NotRegular(f"{name} never ends (every alternative refers to it again)")
    heads, tails = _alternatives(before), _alternatives(after)
    items = [Tree("expr", [heads, Token("OP", "*")])] if heads is not None else []
    items.append(core)
    if tails is not None:
        items.append(Tree("expr", [tails, Token("OP", "*")]))
    return _sequence(items)


def _sequence(items: list[Any]) -> Any:
    from lark import Tree

    return Tree("expansion", items)


def _alternatives(options: list[Any]) -> Any:
    """`a | b | ...` of the options that are there (None: the empty language, no string)."""
    from lark import Tree

    present = [o for o in options if o is not None]
    return Tree("expansions", present) if present else None


def _split(tree: Any, name: str, at_end: bool) -> tuple[Any, Any]:
    """(A, B) with tree's language = A name | B (at_end) or name A | B, name in neither; None for
    a part with no strings. _NotRegular where name is anywhere but that end."""
    from lark.grammar import Symbol

    if not _mentions(tree, name):
        return None, tree
    if isinstance(tree, Symbol):  # name itself: the empty string before (or after) it
        return _sequence([]), None
    if tree.data == "expansions":
        parts = [_split(child, name, at_end) for child in tree.children]
        return _alternatives([a for a, _ in parts]), _alternatives([b for _, b in parts])
    if tree.data == "expansion":
        items = list(tree.children)
        end, others = (items[-1], items[:-1]) if at_end else (items[0], items[1:])
        if any(_mentions(item, name) for item in others):
            raise _NotRegular(f"{name} inside itself")
        a, b = _split(end, name, at_end)

        def around(part):  # a copy of the other items each time: a tree must not hold one node twice
            rest = copy.deepcopy(others)
            return None if part is None else _sequence(rest + [part] if at_end else [part] + rest)
        return around(a), around(b)
    if tree.data == "value":
        return _split(tree.children[0], name, at_end)
    optional = tree.data == "maybe" or tree.data == "expr" and len(tree.children) == 2 and tree.children[1] == "?"
    if optional:  # [x] and x?: x or nothing
        a, b = _split(tree.children[0], name, at_end)
        return a, _alternatives([b, _sequence([])])
    raise _NotRegular(f"{name} repeated ({tree.data})")
