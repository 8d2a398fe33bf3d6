"""A Lark grammar whose rules nest in several ways (JSON's arrays in objects in arrays, a function
call's arguments that are calls) as a recursive transition network: the first half of its token
pushdown automaton on the device (the token tables and the device rows are the second).

lark_regex.py unrolls a rule nested inside itself into a DFA of bounded depth. That works for one
bracket type, but with several the DFA must remember which bracket opened at each level, so its
states multiply with the depth and the grammar stays with llguidance. Here each rule on a cycle of
the grammar (a feedback vertex set of its rule graph: every cycle passes through one, and the
others are inlined) becomes a machine: a character DFA of its body (interegular's, from the regex
lark_regex writes) in which each reference to a machine is one "call" character from Unicode's
private use area. Running it takes a stack of return points:

- a character that is a move of the current state takes it;
- else a call whose callee can start with it pushes the state after the call (a return id) and
  enters the callee;
- else, in an accepting state, the machine returns: the return id is popped and its state
  takes the character.

That greedy choice is the grammar's language when the grammar is LL(1) at the character level:
in every state the moves' characters, each callee's first characters and (where the state
accepts) the characters that may follow the machine are disjoint, and no machine matches the
empty string or calls itself before a character. `conflicts` says where a grammar is not; such a
grammar stays with llguidance. %ignore'd text may stand before any token, so whichever machine
takes it does not change the language: a call is preceded by it as a token is, each machine takes
it after its last token, and ignorable characters are not conflicts.
"""

from __future__ import annotations

import copy
import functools
import itertools
from dataclasses import dataclass, field
from typing import Any

from vibee.runtime.lark_regex import (_REFUSED, _alternatives, _ignored, _json_strings, _placed, _regex, _regex_fsm,
                                      _sequence, _split)

CALL_BASE = 0xE000  # machine i is called by the character chr(CALL_BASE + i)
START = "start"
# What Lark's `%ignore` usually names (WS, WS_INLINE, " "): characters the conflict check lets pass.
IGNORABLE = frozenset(" \t\n\r\f")


@dataclass
class RTN:
    """machines[name]: the character DFA of each machine (interegular FSM), START first; ignorable:
    the characters %ignore may take (none without %ignore)."""

    machines: dict[str, Any]
    ignorable: frozenset[str]
    _moves: dict[tuple[str, int], tuple[dict[str, int], dict[str, int]]] = field(default_factory=dict, repr=False)

    @property
    def names(self) -> list[str]:
        return list(self.machines)

    def moves(self, machine: str, state: int) -> tuple[dict[str, int], dict[str, int]]:
        """(character -> next state, callee -> state after the call) from a state of a machine."""
        key = (machine, state)
        if key not in self._moves:
            import interegular

            fsm = self.machines[machine]
            by_class: dict[int, list[str]] = {}
            for char, cls in fsm.alphabet.items():
                if char != interegular.fsm.anything_else:
                    by_class.setdefault(cls, []).append(char)
            names = self.names
            local, calls = {}, {}
            for cls, to in fsm.map.get(state, {}).items():
                for char in by_class.get(cls, []):
                    code = ord(char) - CALL_BASE
                    if 0 <= code < len(names):
                        calls[names[code]] = to
                    else:
                        local[char] = to
            self._moves[key] = (local, calls)
        return self._moves[key]

    def initial(self, machine: str) -> int:
        return self.machines[machine].initial

    def accepting(self, machine: str, state: int) -> bool:
        return state in self.machines[machine].finals

    @functools.cached_property
    def first(self) -> dict[str, frozenset[str]]:
        """The characters each machine can start with. ValueError where one matches the empty
        string or calls itself before a character (left recursion)."""
        first: dict[str, frozenset[str]] = {}

        def of(name: str, path: tuple[str, ...]) -> frozenset[str]:
            if name in first:
                return first[name]
            if name in path:
                raise ValueError(f"{name} calls itself before a character (left recursion)")
            if self.accepting(name, self.initial(name)):
                raise ValueError(f"{name} matches the empty string")
            local, calls = self.moves(name, self.initial(name))
            chars = set(local)
            for callee in calls:
                chars |= of(callee, (*path, name))
            first[name] = frozenset(chars)
            return first[name]

        for name in self.names:
            of(name, ())
        return first

    @functools.cached_property
    def follow(self) -> dict[str, frozenset[str]]:
        """The characters that may come right after each machine returns (a fixed point over the
        call sites)."""
        first = self.first
        follow: dict[str, set[str]] = {name: set() for name in self.names}
        changed = True
        while changed:
            changed = False
            for machine in self.names:
                for state in self.machines[machine].states:
                    for callee, after in self.moves(machine, state)[1].items():
                        local, calls = self.moves(machine, after)
                        chars = set(local).union(*(first[c] for c in calls))
                        if self.accepting(machine, after):
                            chars |= follow[machine]
                        if not chars <= follow[callee]:
                            follow[callee] |= chars
                            changed = True
        return {name: frozenset(chars) for name, chars in follow.items()}

    def conflicts(self) -> list[str]:
        """Where the greedy run could take a wrong turn: a state whose moves, callees' first
        characters and (accepting, outside START) follow characters overlap, ignorable ones aside.
        Empty: the run is the grammar's language."""
        try:
            first, follow = self.first, self.follow
        except ValueError as exc:
            return [str(exc)]
        found = []
        for machine in self.names:
            for state in self.machines[machine].states:
                local, calls = self.moves(machine, state)
                options = [("a move", frozenset(local))] + [(f"a call of {c}", first[c]) for c in calls]
                if self.accepting(machine, state) and machine != START:
                    options.append(("a return", follow[machine]))
                for (a, chars_a), (b, chars_b) in itertools.combinations(options, 2):
                    clash = (chars_a & chars_b) - self.ignorable
                    if clash:
                        found.append(f"{machine}, state {state}: {a} and {b} both take {''.join(sorted(clash))!r}")
        return found

    def run(self, text: str) -> list[tuple[str, int]] | None:
        """The stack of (machine, state) after text (top last), or None where text is not a prefix
        of the grammar's language."""
        stack = [(START, self.initial(START))]
        for char in text:
            while True:
                machine, state = stack[-1]
                local, calls = self.moves(machine, state)
                if char in local:
                    stack[-1] = (machine, local[char])
                    break
                callee = next((c for c in calls if char in self.first[c]), None)
                if callee is not None:
                    stack[-1] = (machine, calls[callee])
                    stack.append((callee, self.initial(callee)))
                    continue
                if self.accepting(machine, state) and len(stack) > 1:
                    stack.pop()
                    continue
                return None
        return stack

    def accepts(self, text: str) -> bool:
        """Whether text is a whole sentence of the grammar: a prefix whose every machine on the
        stack can return."""
        stack = self.run(text)
        return stack is not None and all(self.accepting(m, s) for m, s in stack)


def lark_rtn(text: str) -> RTN | None:
    """The RTN of a Lark grammar, or None where it has none (a rule Lark can't read or a regex can't
    say, templates, a start rule missing). Conflicts are the caller's to check."""
    from lark.exceptions import LarkError
    from lark.load_grammar import GrammarBuilder

    builder = GrammarBuilder()
    try:
        builder.load_grammar(text, "<grammar>")
        definitions = _json_strings(builder._definitions)
        if START not in definitions or any(d.params for d in definitions.values()):
            return None
        machines = [START, *sorted(_feedback_rules(definitions) - {START})]
        code = {name: i for i, name in enumerate(machines)}
        for name in machines:
            definitions[name].tree = _without_left_recursion(definitions[name].tree, name)
        ignored = _ignored(definitions, builder._ignore_names)
        fsms = {}
        for name in machines:
            body = _body(definitions, name, code, ignored)
            if ignored is not None:  # a machine takes the ignored text after its last token
                body = _sequence([body, copy.deepcopy(ignored)])
            pattern = _regex(body)
            if pattern is not None:
                pattern = _wildcards_without_calls(pattern, chr(CALL_BASE) + "-" + chr(CALL_BASE + len(machines) - 1))
            if pattern is None:
                return None
            fsms[name] = _fsm(pattern)
        return RTN(fsms, IGNORABLE if ignored is not None else frozenset())
    except (LarkError, *_REFUSED):
        return None


def _without_left_recursion(tree: Any, name: str) -> Any:
    """`name: tree` with its direct left recursion solved: the alternatives `name C` and the rest B
    make `B C*` (Arden's lemma), so `elements: elements "," value | value` is a machine that reads a
    list, not one that calls itself before a character. name elsewhere in an alternative (inside
    brackets, at its end) stays a call; an alternative _split can't read stays as it is (and the
    conflict check names the left recursion)."""
    from lark import Token, Tree

    heads, rest = [], []
    for alternative in tree.children if tree.data == "expansions" else [tree]:
        try:
            head, other = _split(alternative, name, at_end=False, nested=True)
        except _REFUSED:
            head, other = None, alternative
        if head is not None:
            heads.append(head)
        if other is not None:
            rest.append(other)
    if not heads or not rest:  # no left recursion, or nothing but (never ends: _endless says so)
        return tree
    return _sequence([_alternatives(rest), Tree("expr", [_alternatives(heads), Token("OP", "*")])])


def _wildcards_without_calls(regex: str, calls: str) -> str | None:
    """regex with its wildcards (negated classes, `.`, `\\S`, `\\W`, `\\D`) kept off the call characters
    (`calls`, a class range): else a string's `[^"]*` would take a call as one of its characters.
    None where that can't be written (a negated shorthand inside a class, a dot that matches newlines)."""
    import re

    if re.search(r"\(\?[a-zA-Z]*s", regex):  # (?s: a dot that takes newlines too
        return None
    negated = {"S": r"\s", "W": r"\w", "D": r"\d"}
    out: list[str] = []
    i, in_class = 0, False
    while i < len(regex):
        c = regex[i]
        if c == "\\":
            escape = regex[i:i + 2]
            if escape[1:] in negated:
                if in_class:
                    return None
                out.append(f"[^{negated[escape[1]]}{calls}]")
            else:
                out.append(escape)
            i += 2
        elif in_class:
            in_class = c != "]"
            out.append(c)
            i += 1
        elif c == "[":
            in_class, i = True, i + 1
            negate = regex[i:i + 1] == "^"
            i += negate
            out.append("[^" if negate else "[")
            if regex[i:i + 1] in ("]", "-"):  # a first "]" or "-" is a character of the class
                out.append(regex[i])
                i += 1
            if negate:
                out.append(calls)
        elif c == ".":
            out.append(f"[^\\n{calls}]")
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _fsm(pattern: str) -> Any:
    return _regex_fsm(pattern).reduce()


def _rule_graph(definitions: dict[str, Any]) -> dict[str, set[str]]:
    """rule -> the rules its tree names."""
    from lark import Tree
    from lark.grammar import Symbol

    graph = {}
    for name, definition in definitions.items():
        if definition.is_term or definition.tree is None:
            continue
        named, todo = set(), [definition.tree]
        while todo:
            node = todo.pop()
            for child in node.children:
                if isinstance(child, Symbol):
                    named.add(child.name)
                elif isinstance(child, Tree):
                    todo.append(child)
        graph[name] = named
    return {name: named & graph.keys() for name, named in graph.items()}


def _feedback_rules(definitions: dict[str, Any]) -> set[str]:
    """Rules that cut every cycle of the rule graph, chosen greedily: a rule that names itself
    first, then the one named most by the others on cycles (fewer machines, fewer return ids)."""
    graph = _rule_graph(definitions)
    chosen: set[str] = set()

    def on_cycle(name: str) -> bool:
        seen, todo = set(), [n for n in graph[name] if n not in chosen]
        while todo:
            n = todo.pop()
            if n == name:
                return True
            if n not in seen:
                seen.add(n)
                todo.extend(m for m in graph[n] if m not in chosen)
        return False

    while True:
        cyclic = [name for name in graph if name not in chosen and on_cycle(name)]
        if not cyclic:
            return chosen
        chosen.add(max(cyclic, key=lambda n: (n in graph[n], sum(n in graph[m] for m in cyclic), n)))


def _body(definitions: dict[str, Any], name: str, code: dict[str, int], ignored: Any) -> Any:
    """A copy of `name`'s tree with every rule and terminal that is not a machine in its place, and
    each machine it names as that machine's call character, preceded by ignored text as a token is."""
    from lark import Token, Tree

    def place(named: str) -> tuple[Any, bool]:
        if named in code:
            return Tree("literal", [Token("STRING", '"' + chr(CALL_BASE + code[named]) + '"')]), True
        inner = definitions[named]
        return _body(definitions, named, code, None if inner.is_term else ignored), inner.is_term

    return _placed(definitions, name, ignored, place)

