"""`response_format` (OpenAI's json_object and json_schema, and vibee's Lark grammar and regex)
as the grammar the engine constrains the output with; a grammar that can't be used is a 400."""

from __future__ import annotations

import asyncio
from typing import Any

from vibee.runtime.structured_output import (GrammarError, grammar_for_json_object, grammar_for_json_schema,
                                             grammar_for_lark, grammar_for_regex)
from vibee.server.errors import bad_request, one_line
from vibee.server.protocol import ResponseFormat


def format_grammar(fmt: ResponseFormat | None) -> str | None:
    """The grammar text of a response_format (None: unconstrained)."""
    if fmt is None or fmt.type == "text":
        return None
    try:
        if fmt.type == "json_object":
            return grammar_for_json_object()
        if fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise bad_request("response_format json_schema needs its json_schema object.",
                                  param="response_format.json_schema")
            return grammar_for_json_schema(fmt.json_schema.schema_)
        text = fmt.grammar if fmt.type == "grammar" else fmt.regex
        if not text:
            raise bad_request(f"response_format {fmt.type} needs its {fmt.type!r} text.",
                              param=f"response_format.{fmt.type}")
        return grammar_for_lark(text) if fmt.type == "grammar" else grammar_for_regex(text)
    except GrammarError as exc:
        raise bad_request(one_line(str(exc)), param="response_format") from None


async def checked_grammar(state: Any, grammar: str | None, param: str) -> str | None:
    """The grammar, once the tokenizer's compiler accepts it (off the event loop: a large schema
    takes milliseconds to compile, the tokenizer's trie about a second the first time)."""
    if grammar is None:
        return None
    try:
        await asyncio.to_thread(state.structured_outputs().check, grammar)
    except GrammarError as exc:
        raise bad_request(_first_lines(str(exc)), param=param) from None
    return grammar


def _first_lines(message: str) -> str:
    """A grammar error's message with its source line and caret kept (at most 5 lines)."""
    return "\n".join(message.strip().splitlines()[:5])
