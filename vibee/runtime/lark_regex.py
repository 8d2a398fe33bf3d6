"""A Lark grammar whose language is regular, written as one regex (so that it decodes from a token
DFA on the device, token_dfa.py): every rule and terminal a rule uses is put in its place, and the
EBNF operators (`*`, `+`, `?`, `[...]`, `~ n..m`) become the regex's own. A grammar that refers to a
rule from inside itself (recursion), or uses what a regex can't say the same way (`%ignore`,
templates, case-insensitive or other flagged literals) or Lark can't read (llguidance's extensions:
`%json`, `&`, `~` on terminals, special tokens) has no regex here and stays with llguidance.

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
        if builder._ignore_names or "start" not in definitions or any(d.params for d in definitions.values()):
            return None
        tree = _inlined(definitions, "start", ())
        pattern = TerminalTreeToPattern().transform(PrepareLiterals().transform(tree))
    except (_NotRegular, LarkError, ValueError, TypeError, KeyError, AttributeError, AssertionError):
        return None  # not regular, llguidance's dialect, or an error llguidance reports with its caret
    return None if pattern.flags else pattern.to_regexp()


def _inlined(definitions: dict[str, Any], name: str, stack: tuple[str, ...]) -> Any:
    """A copy of rule or terminal `name`'s tree with every rule and terminal it names in its place."""
    from lark import Tree
    from lark.grammar import Symbol

    if name in stack:
        raise _NotRegular(f"{name} refers to itself")
    definition = definitions.get(name)
    if definition is None or definition.tree is None:
        raise _NotRegular(f"{name} is declared, not defined")
    tree = copy.deepcopy(definition.tree)
    todo = [tree]
    while todo:
        node = todo.pop()
        for i, child in enumerate(node.children):
            if isinstance(child, Symbol):
                node.children[i] = _inlined(definitions, child.name, (*stack, name))
            elif isinstance(child, Tree):
                if child.data == "alias":  # `a b -> name`: a name for the tree, not a change to the language
                    child = node.children[i] = child.children[0]
                elif child.data == "template_usage":
                    raise _NotRegular("templates")
                todo.append(child)
    return tree
