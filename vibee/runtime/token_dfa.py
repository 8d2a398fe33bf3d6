"""Token-level DFAs: a regular constraint (a regex, or a JSON schema that is one) compiled once
against the vocabulary into tables the device reads, so that its rows are masked and advanced on
the device, inside decode rounds, with no host round trip per token.

interegular builds the DFA over characters and every token is walked through it (numpy over the
vocabulary): for each state, the tokens allowed and the state each leads to; outlines_core writes
a JSON schema as a regex, lark_regex.py a Lark grammar as one (or, where its rules nest, as a DFA
of the grammar nested up to a depth). The table next[s, t]
is the state token t leads to from state s (-1: t is not allowed); grammar_table.py loads it onto
the device with its bitmask. The end-of-sequence tokens are allowed in final states only and
lead to a sink that allows only them, so a constraint that is complete ends its choice with
finish_reason "stop", as llguidance's host masks do.

Text the pattern forces keeps to its canonical tokens when the tokenizer's encode is given, as
llguidance's masks do (tool calls' fixed text needs it: vibee/server/tool_calls.py writes a tool
plan as one regex). JSON mode (json_object) is not regular: json_pda.py compiles it to a token
automaton with a stack. A Lark grammar whose DFA nested that deep has too many states stays with
llguidance (structured_output.py), as does one whose DFA does not fit the table's free rows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vibee.runtime.lark_regex import NESTED_LARK, lark_fsm, lark_pattern


class NotRegular(ValueError):
    """A constraint this module can't compile (the host's llguidance takes it)."""


# Longer patterns go to llguidance: the character DFA of a schema with a free-form object (a
# depth-bounded JSON value, ~7,000 characters of regex) takes seconds to build, on the engine's
# thread; the schemas of records and tool arguments are a few hundred characters.
MAX_PATTERN_CHARS = 2000


def regex_for_schema(schema: Any) -> str:
    """The regex of JSON text valid under `schema` (a dict or its JSON text), or NotRegular."""
    from outlines_core.json_schema import build_regex_from_schema

    text = schema if isinstance(schema, str) else json.dumps(schema)
    try:
        return build_regex_from_schema(text)
    except Exception as exc:  # noqa: BLE001 - outlines_core raises its own types for what it can't express
        raise NotRegular(f"the schema has no regular form: {exc}") from None


# JSON mode's key where a regex would be: its constraint is a pushdown automaton (json_pda.py).
JSON_OBJECT = ("json_object",)


def device_pattern(grammar: str) -> str | tuple | None:
    """What the device constrains `grammar` with: its regex or a nested Lark grammar's key
    (regular_pattern), JSON_OBJECT for JSON mode as grammar_for_json_object writes it (compact, any
    depth), else None (llguidance)."""
    try:
        parts = json.loads(grammar)["grammars"]
        if len(parts) == 1 and parts[0].get("json_schema") == {"type": "object", "x-guidance": {"whitespace_flexible": False}}:
            return JSON_OBJECT
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    return regular_pattern(grammar)


def regular_pattern(grammar: str) -> str | tuple | None:
    """The regex of an llguidance grammar (structured_output.py's grammar_for_*) when it is one:
    a regex grammar, a JSON schema outlines_core writes as a regex, or a Lark grammar (lark_regex.py:
    its regex, or (NESTED_LARK, text) where its rules nest); None for the rest (JSON objects of any
    depth, llguidance's Lark extensions), which only llguidance constrains."""
    try:
        parts = json.loads(grammar)["grammars"]
    except (ValueError, KeyError, TypeError):
        return lark_pattern(grammar)  # grammar_for_lark's: the Lark text as written
    if len(parts) != 1:
        return None
    part = parts[0]
    schema, lark = part.get("json_schema"), part.get("lark_grammar")
    if schema is not None:
        schema = {k: v for k, v in schema.items() if k != "x-guidance"} if isinstance(schema, dict) else schema
        if schema == {"type": "object"}:  # JSON mode: any object, of any depth (not regular)
            return None
        try:
            return regex_for_schema(schema)
        except NotRegular:
            return None
    match = re.fullmatch(r"start: /(.*)/", lark or "", flags=re.S)
    if part.get("name") != "regex" or match is None:
        return None
    # llguidance writes the regex as a Lark literal, its slashes escaped: undo that, pair by pair.
    return re.sub(r"\\(.)", lambda m: "/" if m.group(1) == "/" else m.group(0), match.group(1), flags=re.S)


@dataclass(frozen=True)
class TokenDFA:
    """A constraint's tables, states 0..S-1 (0 the initial state, S-1 the end sink)."""

    next: np.ndarray  # int32 [S, V]: the state a token leads to, -1 where it is not allowed
    final: np.ndarray  # bool [S]: the output so far is a whole match (end tokens allowed)

    @property
    def num_states(self) -> int:
        return self.next.shape[0]

    def allowed(self, state: int) -> np.ndarray:
        return np.flatnonzero(self.next[state] >= 0)


def token_bytes(ll_tokenizer: Any, size: int) -> list[bytes | None]:
    """Each token's bytes as the tokenizer writes them (None: a special token, never allowed
    but as an end token)."""
    special = getattr(ll_tokenizer, "is_special_token", None)
    out: list[bytes | None] = []
    for i in range(size):
        if special is not None and special(i):
            out.append(None)
            continue
        b = ll_tokenizer.decode_bytes([i])
        out.append(b if b else None)
    return out


def compile_dfa(pattern: str | tuple, tokens: Sequence[bytes | None], eos_token_ids: Sequence[int], vocab_size: int,
                max_states: int, encode: Callable[[str], list[int]] | None = None) -> TokenDFA:
    """The token DFA of `pattern` (Python regex syntax, matched against the whole output, or
    (NESTED_LARK, text): a Lark grammar whose rules nest, lark_fsm's DFA) over a vocabulary whose
    token i is tokens[i]; vocab_size (>= len(tokens)) is the logits' width. NotRegular when the
    pattern does not compile or has more than max_states states.

    interegular turns the pattern into a DFA over characters (with classes of characters); every
    token is walked through it from every state at once, one character position at a time
    (numpy over the vocabulary). States from which no match can be completed are dropped, so a
    token is allowed exactly when the text stays a prefix of some match. A token that is not
    whole UTF-8 text (a piece of a character) is never allowed. With `encode` (text -> the
    tokenizer's ids), forced text is kept to its canonical tokens (_canonical_forced_text)."""
    import interegular

    if not eos_token_ids:
        raise NotRegular("the model has no end-of-sequence token")
    if isinstance(pattern, tuple) and pattern[0] == NESTED_LARK:
        fsm = lark_fsm(pattern[1])
        if fsm is None:
            raise NotRegular("its rules nest into more states than the device's DFA holds")
    elif len(pattern) > MAX_PATTERN_CHARS:
        raise NotRegular(f"the pattern has {len(pattern)} characters, more than the {MAX_PATTERN_CHARS} compiled here")
    else:
        try:
            fsm = interegular.parse_pattern(pattern).to_fsm()
        except Exception as exc:  # noqa: BLE001 - interegular's parse errors have no common base
            raise NotRegular(f"the pattern has no DFA: {exc}") from None
    eos = sorted(eos_token_ids)
    live = _live_states(fsm)
    if fsm.initial not in live:
        raise NotRegular("the pattern matches no text")
    order = [fsm.initial] + sorted(live - {fsm.initial})
    number = {state: j for j, state in enumerate(order)}
    sink = len(order)
    if sink + 1 > max_states:
        raise NotRegular(f"its DFA has {sink + 1} states, more than the {max_states} the table has free")
    other = fsm.alphabet[interegular.fsm.anything_else] if interegular.fsm.anything_else in fsm.alphabet else -1
    classes = 1 + max(fsm.alphabet.values())
    step = np.full((sink, classes), -1, dtype=np.int32)  # state (our numbering) x character class -> state
    for state, moves in fsm.map.items():
        if state in number:
            for cls, to in moves.items():
                if to in number:
                    step[number[state], cls] = number[to]
    chars, lengths = _token_classes(tokens, fsm.alphabet, other, eos)
    # Tokens longest first: character position p moves only the first (tokens longer than p) of them.
    by_length = np.argsort(-lengths, kind="stable")
    chars, lengths = chars[by_length], lengths[by_length]
    longer = [int(np.count_nonzero(lengths > p)) for p in range(chars.shape[1])]
    table = np.full((sink + 1, vocab_size), -1, dtype=np.int32)
    for state in range(sink):
        at = np.where(lengths > 0, state, -1).astype(np.int32)  # length 0: special, empty, not whole UTF-8 text
        for pos, n in enumerate(longer):
            head = at[:n]
            alive = head >= 0
            head[alive] = step[head[alive], chars[:n, pos][alive]]
        table[state, by_length] = at
    final = np.zeros(sink + 1, dtype=bool)
    for state in fsm.finals & live:
        final[number[state]] = True
    if encode is not None:
        _canonical_forced_text(table, step, final, fsm.alphabet.by_transition, tokens, encode)
    table[np.flatnonzero(final)[:, None], eos] = sink
    table[sink, eos] = sink
    final[sink] = True
    return TokenDFA(table, final)


def _canonical_forced_text(table: np.ndarray, step: np.ndarray, final: np.ndarray, by_class: dict[int, list[Any]],
                           tokens: Sequence[bytes | None], encode: Callable[[str], list[int]]) -> None:
    """Where the next characters are forced (one character leads on, and the text so far is not a
    match) and the tokenizer writes them as two tokens or more, allow only the first of those:
    the model then reads the tokens it was trained on (as llguidance's host masks do, and as a
    tool call's fixed `{"name": "...", "arguments": ` needs: a small model drifts when any
    spelling of it is allowed). The last token of forced text stays free, as it may run on into
    what follows. A tokenization that does not spell the text back (a prefix space, byte pieces)
    leaves the state as it is."""
    single = {cls: chars[0] for cls, chars in by_class.items() if len(chars) == 1 and isinstance(chars[0], str)}
    forced: dict[int, str] = {}

    def forced_text(state: int) -> str:  # the characters forced from state on (iterative: chains run long)
        chain, at = [], state
        while at not in forced:
            moves = np.flatnonzero(step[at] >= 0)
            if final[at] or len(moves) != 1 or int(moves[0]) not in single:
                forced[at] = ""
                break
            chain.append((at, single[int(moves[0])]))
            at = int(step[at, moves[0]])
            if len(chain) > step.shape[0]:  # a forced cycle has no final state: never live, never here
                break
        text = forced.get(at, "")
        for at, char in reversed(chain):
            text = char + text
            forced[at] = text
        return forced.get(state, "")

    for state in range(step.shape[0]):
        text = forced_text(state)
        if len(text) < 2:
            continue
        ids = encode(text)
        if len(ids) < 2 or any(i >= len(tokens) or tokens[i] is None for i in ids) \
                or b"".join(tokens[i] for i in ids) != text.encode("utf-8") or table[state, ids[0]] < 0:
            continue
        to = table[state, ids[0]]
        table[state] = -1
        table[state, ids[0]] = to


def _live_states(fsm: Any) -> set[int]:
    """The states from which a final state can be reached."""
    back: dict[int, set[int]] = {}
    for state, moves in fsm.map.items():
        for to in moves.values():
            back.setdefault(to, set()).add(state)
    live, todo = set(fsm.finals), list(fsm.finals)
    while todo:
        for prev in back.get(todo.pop(), ()):
            if prev not in live:
                live.add(prev)
                todo.append(prev)
    return live


def _token_classes(tokens: Sequence[bytes | None], alphabet: Any, other: int,
                   eos: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """[V, longest token] the character class of each token's characters, and [V] each token's
    length in characters; length 0 for a token with no usable text (special, an end token,
    empty, not whole UTF-8) or with a character the pattern's alphabet has no class for."""
    texts: list[str] = []
    for i, b in enumerate(tokens):
        try:
            texts.append(b.decode("utf-8") if b and i not in eos else "")
        except UnicodeDecodeError:
            texts.append("")
    width = max(map(len, texts), default=0) or 1
    chars = np.zeros((len(tokens), width), dtype=np.int32)
    lengths = np.zeros(len(tokens), dtype=np.int64)
    for i, text in enumerate(texts):
        row = [alphabet[c] if c in alphabet else other for c in text]
        if row and min(row) >= 0:
            chars[i, : len(row)] = row
            lengths[i] = len(row)
    return chars, lengths
