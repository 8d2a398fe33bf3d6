"""The parse of texts without syntax errors: Lark's contextual lexer regexes and LALR table,
driven by tighter loops than Lark's own (reduce actions are looked up once per grammar, not per
token; positions are counted per token, not per character). A syntax error raises Lark's
UnexpectedInput; recovery.py then parses the text again with Lark's interactive parser."""

from __future__ import annotations

from lark import Lark, Token
from lark.exceptions import UnexpectedCharacters, UnexpectedToken
from lark.parsers.lalr_analysis import Shift


# Token's constructor without the wrapper that checks for a deprecated keyword (Lark >= 1.1.6).
_NEW_TOKEN = getattr(Token, "_future_new", Token)


class LALRLoop:
    def __init__(self, lark: Lark):
        frontend = lark.parser
        table = frontend.parser.parser.parse_table
        callbacks = frontend.parser.parser.callbacks
        contextual = frontend.lexer.lexer
        self.postlexer = frontend.lexer.postlexer
        # The regexes Lark's contextual lexer would try in each parser state (the same order and
        # priorities, so both lex alike); the grammar has no lexer callbacks to honour.
        self.scanners = {state: lexer.scanner._mres for state, lexer in contextual.lexers.items()}
        assert all(len(regexes) == 1 for regexes in self.scanners.values())  # Lark splits only huge unions
        self.scanners = {state: regexes[0] for state, regexes in self.scanners.items()}
        self.ignore = frozenset(contextual.root_lexer.ignore_types)
        self.start = table.start_states["start"]
        self.end = table.end_states["start"]
        # state -> token type -> (next state, None) for a shift, or (rule size, rule name, callback).
        # Keys are plain str: Lark's are Tokens, whose __eq__ would run on every lookup.
        self.actions: dict[int, dict[str, tuple]] = {
            state: {str(kind): ((arg, None, None) if action is Shift else
                                (len(arg.expansion), str(arg.origin.name), callbacks[arg]))
                    for kind, (action, arg) in row.items()}
            for state, row in table.states.items()
        }

    def parse(self, text: str):
        actions, end = self.actions, self.end
        states = [self.start]
        values: list = []
        for token in _then_end(self.postlexer.process(self._lex(text, states))):
            kind = token.type
            while True:  # reduce until the token can be shifted
                try:
                    target, name, callback = actions[states[-1]][kind]
                except KeyError:
                    raise UnexpectedToken(token, set(actions[states[-1]])) from None
                if name is None:
                    states.append(target)
                    values.append(token)
                    break
                if target:
                    children = values[-target:]
                    del states[-target:]
                    del values[-target:]
                else:
                    children = []
                values.append(callback(children))
                states.append(actions[states[-1]][name][0])
                if kind == "$END" and states[-1] == end:
                    return values[-1]
        raise AssertionError("the parse table accepts only at $END")


    def _lex(self, text: str, states: list[int]):
        """Tokens of `text`, each lexed in the parser state it will meet (the stack's top)."""
        scanners, ignore, new_token = self.scanners, self.ignore, _NEW_TOKEN
        pos, line, line_start, end = 0, 1, 0, len(text)
        while pos < end:
            match = scanners[states[-1]].match(text, pos)
            if match is None:
                raise UnexpectedCharacters(text, pos, line, pos - line_start + 1)
            start, pos = pos, match.end()
            value = match.group()
            breaks = value.count("\n")
            if breaks:
                end_line, next_start = line + breaks, start + value.rfind("\n") + 1
            else:
                end_line, next_start = line, line_start
            kind = match.lastgroup
            if kind not in ignore:
                yield new_token(kind, value, start, line, start - line_start + 1, end_line, pos - next_start + 1, pos)
            line, line_start = end_line, next_start


def _then_end(tokens):
    token = None
    for token in tokens:
        yield token
    yield Token.new_borrow_pos("$END", "", token) if token is not None else Token("$END", "", 0, 1, 1)
