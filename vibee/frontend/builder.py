"""Parse tree -> document: a Lark Transformer that builds Mapping / Sequence / Scalar nodes, each
with its Span, as the LALR parser reduces rules (no parse tree is kept)."""

from __future__ import annotations

from lark import Token, Transformer

from vibee.frontend.document import Mapping, Node, Scalar, Sequence, Span
from vibee.frontend.scalars import block_scalar_text, double_quoted, resolve_plain
from vibee.frontend.source import ParseRun


class _Empty:
    """The value of `key:` with nothing after it (becomes a null Scalar positioned after ':')."""


_EMPTY = _Empty()


class DocumentBuilder(Transformer):
    """One method per grammar rule. Callbacks must not mutate their children: a rollback after
    an error reuses them."""

    def __init__(self) -> None:
        super().__init__(visit_tokens=False)
        self.run: ParseRun | None = None

    # -- helpers

    def _span(self, tok: Token) -> Span:
        return Span(self.run.path, tok.line, tok.column, tok.end_line, tok.end_column)

    def _between(self, first: Span, last: Span) -> Span:
        return Span(self.run.path, first.line, first.col, last.end_line, last.end_col)

    def _null_after(self, tok: Token) -> Scalar:
        """The null value of an empty entry, just after its ':' or '-' (whose token also holds
        the blanks that follow it)."""
        return Scalar(None, Span(self.run.path, tok.line, tok.column + 1, tok.line, tok.column + 1))

    def _report(self, line: int, col: int, end_col: int, message: str, hint: str) -> None:
        self.run.error(self.run.span(line, col, line, end_col), message, hint)

    def _mapping(self, pairs: list[tuple[Scalar, Node]], span: Span) -> Mapping:
        seen: dict[str, Scalar] = {}
        for key, _ in pairs:
            name = str(key.value)
            if name in seen:
                self.run.error(key.span, f"duplicate key '{name}' (first defined at line {seen[name].span.line})",
                               "remove one of them, or rename it")
            else:
                seen[name] = key
        return Mapping(list(pairs), span)

    # -- block collections

    def start(self, children):
        if children:
            return children[0]
        return Mapping([], Span(self.run.path, 1, 1, 1, 1))

    def block_mapping(self, pairs):
        return self._mapping(pairs, self._between(pairs[0][0].span, pairs[-1][1].span))

    def pair(self, children):
        key, colon, value = children
        if value is _EMPTY:
            value = self._null_after(colon)
        return key, value

    def empty_value(self, _children):
        return _EMPTY

    def inline_value(self, children):
        return children[0]

    nested_value = inline_value

    def block_sequence(self, items):
        span = Span(self.run.path, items[0][0].line, items[0][0].column, items[-1][1].span.end_line,
                    items[-1][1].span.end_col)
        return Sequence([node for _, node in items], span)

    def empty_item(self, children):
        dash = children[0]
        return dash, self._null_after(dash)

    def inline_item(self, children):
        return children[0], children[1]

    nested_item = inline_item

    # -- scalars

    def plain_key(self, children):
        tok = children[0]
        return Scalar(str(tok), self._span(tok))

    def dq_key(self, children):
        return self.dq(children)

    def sq_key(self, children):
        return self.sq(children)

    def plain(self, children):
        tok = children[0]
        text = str(tok)
        if "\n" in text:  # a plain scalar over several lines: YAML folds them with spaces
            text = " ".join(line.strip(" \t") for line in text.split("\n"))
        return Scalar(resolve_plain(text), self._span(tok))

    @staticmethod
    def _quoted_body(tok: Token) -> str:
        return str(tok)[1:] if tok.type.startswith("UNCLOSED") else str(tok)[1:-1]

    def sq(self, children):
        tok = children[0]
        return Scalar(self._quoted_body(tok).replace("''", "'"), self._span(tok), quoted=True)

    def dq(self, children):
        tok = children[0]
        return Scalar(double_quoted(tok, self._quoted_body(tok), self._report), self._span(tok), quoted=True)

    def triple_quoted(self, children):
        tok = children[0]
        body = str(tok)[3:-3]
        return Scalar(body[1:] if body.startswith("\n") else body, self._span(tok), quoted=True)

    def block_scalar(self, children):
        header = children[0]
        text, last = block_scalar_text(header, children[1:], self._report)
        end = last if last is not None else header
        return Scalar(text, Span(self.run.path, header.line, header.column, end.end_line, end.end_column), quoted=True)

    # -- flow collections

    def flow_mapping(self, children):
        pairs = [c for c in children if isinstance(c, tuple)]
        return self._mapping(pairs, self._between(self._span(children[0]), self._span(children[-1])))

    def flow_pair(self, children):
        key, colon = children[0], children[1]
        value = children[2] if len(children) > 2 else self._null_after(colon)
        return key, value

    def flow_key_only(self, children):
        key = children[0]
        end = key.span
        if not key.quoted and ":" in str(key.value):
            # YAML reads "{a:1}" as the key "a:1" with a null value; nobody means that.
            self.run.error(end, f"flow mapping entry '{key.value}' has no ': '",
                           "write each entry of a flow mapping as 'key: value', with a space after ':'")
        return key, Scalar(None, Span(self.run.path, end.end_line, end.end_col, end.end_line, end.end_col))

    def single_pair_mapping(self, children):
        key, value = self.flow_pair(children)
        return self._mapping([(key, value)], self._between(key.span, value.span))

    def flow_sequence(self, children):
        items = [c for c in children if not isinstance(c, Token)]
        return Sequence(items, self._between(self._span(children[0]), self._span(children[-1])))
