"""Tool calling on grammars: `tools` and `tool_choice` become a grammar the output keeps to, and
the output becomes OpenAI's `tool_calls`.

Calls are written in one of two formats, picked from the chat template:
- "hermes" (Qwen, Hermes, and vibee's own prompt): each call is
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`; several may follow each other.
- "llama" (a template that knows `tools` and asks for "parameters", as Llama 3.1's does): one bare
  JSON object `{"name": ..., "parameters": {...}}`.

tool_choice "none" generates text (the template still sees the tools); "required" one call or
more (one when parallel_tool_calls is false); a named function exactly one call of it; "auto"
(the default with tools) either plain text, which may not start with the call's opening, or
calls. A template that does not render `tools` gets them in a system message of vibee's, with
the format to answer in. A plan is one regex when its parameter schemas have a regular form (a
token DFA on the device), else a Lark grammar with `%json` parts (llguidance's host masks).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from vibee.runtime.structured_output import grammar_for_lark, grammar_for_regex
from vibee.runtime.token_dfa import MAX_PATTERN_CHARS, NotRegular, regex_for_schema
from vibee.server.errors import bad_request

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@dataclass
class ToolPlan:
    tools: list[dict[str, Any]]  # the request's tools, checked: {"type": "function", "function": {...}}
    choice: str  # "none", "auto", "required", or the one function's name
    format: str  # "hermes" or "llama"
    parallel: bool
    grammar: str | None  # None for "none"

    @property
    def functions(self) -> list[dict[str, Any]]:
        return [t["function"] for t in self.tools]

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, tool_calls) of a finished output: calls when the text holds complete ones
        (a constrained output always does unless it ran out of tokens), else the text itself."""
        if self.choice == "none":
            return text, []
        if self.format == "llama":
            bodies = [text.strip()] if text.lstrip().startswith("{") else []
        else:
            bodies = _HERMES_CALL.findall(text) if text.lstrip().startswith("<tool_call>") else []
        calls = []
        for body in bodies:
            try:
                call = json.loads(body)
            except json.JSONDecodeError:
                return text, []
            arguments = call.get("parameters" if self.format == "llama" else "arguments", {})
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": call.get("name"), "arguments": json.dumps(arguments, ensure_ascii=False)}})
        return (None, calls) if calls else (text, [])

    def is_call(self, text: str) -> bool:
        """Whether a streamed output that begins with `text` is calls (it will not be plain text)."""
        if self.choice == "none":
            return False
        opening = "{" if self.format == "llama" else OPEN.strip()
        return self.choice != "auto" or text.lstrip().startswith(opening)

    def may_be_call(self, text: str) -> bool:
        """Whether a streamed output that begins with `text` can still become calls (its deltas
        are held until it is known)."""
        if self.choice == "none":
            return False
        if self.choice != "auto":
            return True
        start = text.lstrip()
        opening = "{" if self.format == "llama" else OPEN.strip()
        return start.startswith(opening) or opening.startswith(start)


def _json_value_end(text: str, start: int) -> int | None:
    """Where the JSON object or array opening at text[start] ends (the index after its closing
    bracket), or None while it is still open (strings and escapes are skipped)."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


@dataclass
class CallStream:
    """A streamed output's calls as they are written: each call's name once it is whole, then
    its arguments' JSON text piece by piece (OpenAI's streamed tool_calls deltas). The grammar
    writes a call exactly as `{"name": "<name>", "arguments": ` + the arguments + `}` (hermes:
    inside <tool_call> tags; llama: "parameters"); text that does not read so yields nothing
    more, and the whole calls come at the end instead."""

    plan: ToolPlan
    sent: list[int] = field(default_factory=list)  # per call begun: characters of its arguments sent
    ids: list[str] = field(default_factory=list)
    broken: bool = False

    def deltas(self, text: str) -> list[dict[str, Any]]:
        """The tool_calls deltas that the output `text` (everything so far) adds to what was sent."""
        out: list[dict[str, Any]] = []
        if self.broken:
            return out
        for index, (name, arguments) in enumerate(self._calls(text)):
            piece = arguments[self.sent[index]:] if index < len(self.sent) else arguments
            if index == len(self.sent):  # a new call: its id, type and name come first, once
                self.sent.append(0)
                self.ids.append(f"call_{uuid.uuid4().hex[:24]}")
                out.append({"index": index, "id": self.ids[index], "type": "function",
                            "function": {"name": name, "arguments": piece}})
            elif piece:
                out.append({"index": index, "function": {"arguments": piece}})
            self.sent[index] = len(arguments)
        return out

    def _calls(self, text: str) -> list[tuple[str, str]]:
        """(name, arguments text so far) of each call begun in text whose name is whole."""
        key = "parameters" if self.plan.format == "llama" else "arguments"
        head, calls, at = '{"name": "', [], 0
        body = text.lstrip()
        while True:
            if self.plan.format == "hermes":
                if not body.startswith(OPEN, at):
                    self.broken = not OPEN.startswith(body[at:])
                    break
                at += len(OPEN)
            if not body.startswith(head, at):
                self.broken = not head.startswith(body[at:])
                break
            end = body.find('"', at + len(head))
            if end < 0:
                break
            lead = f'", "{key}": '
            if not body.startswith(lead, end):
                self.broken = not lead.startswith(body[end:])
                break
            start = end + len(lead)
            close = _json_value_end(body, start) if start < len(body) else None
            calls.append((body[at + len(head): end], body[start: len(body) if close is None else close]))
            # The call's own closing brace, then (hermes) its closing tag and a newline before the next.
            after = "}" if self.plan.format == "llama" else "}" + CLOSE + "\n"
            if close is None or self.plan.format == "llama" or not body.startswith(after, close):
                break
            at = close + len(after)
        return calls


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: Any, parallel_tool_calls: bool | None,
               chat_template: str) -> ToolPlan | None:
    """The tool plan of a chat request, or None without tools; 400s name the field at fault."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise bad_request("tool_choice needs tools.", param="tool_choice")
        return None
    names = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise bad_request("Each tool must be {\"type\": \"function\", \"function\": {...}}.", param=f"tools[{i}]")
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise bad_request("A function's name must be 1 to 64 letters, digits, '_', '.' or '-'.",
                              param=f"tools[{i}].function.name")
        if name in names:
            raise bad_request(f"Two tools are named {name!r}.", param=f"tools[{i}].function.name")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise bad_request("A function's parameters must be a JSON schema object.",
                              param=f"tools[{i}].function.parameters")
        names.append(name)
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        choice = tool_choice or "auto"
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        choice = tool_choice["function"].get("name")
        if choice not in names:
            raise bad_request(f"tool_choice names {choice!r}, which is not among the tools.", param="tool_choice")
    else:
        raise bad_request("tool_choice must be 'none', 'auto', 'required' or "
                          "{\"type\": \"function\", \"function\": {\"name\": ...}}.", param="tool_choice")
    fmt = "llama" if ("tools" in chat_template and "<tool_call>" not in chat_template
                      and "parameters" in chat_template) else "hermes"
    plan = ToolPlan(list(tools), choice, fmt, parallel_tool_calls is not False, None)
    if choice != "none":
        pattern = _pattern(plan)
        plan.grammar = grammar_for_regex(pattern) if pattern is not None else grammar_for_lark(_lark(plan))
    return plan


def _call_schema(function: dict[str, Any], fmt: str) -> dict[str, Any]:
    args = "parameters" if fmt == "llama" else "arguments"
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    return {"type": "object", "properties": {"name": {"const": function["name"]}, args: parameters},
            "required": ["name", args], "additionalProperties": False,
            "x-guidance": {"whitespace_flexible": False}}  # one space after ':' and ',', no newlines


def _lark(plan: ToolPlan) -> str:
    """The plan's grammar in llguidance's Lark: JSON parts as %json schemas."""
    functions = [f for f in plan.functions if plan.choice in ("auto", "required", f["name"])]
    schema = {"anyOf": [_call_schema(f, plan.format) for f in functions],
              "x-guidance": {"whitespace_flexible": False}} if len(functions) > 1 \
        else _call_schema(functions[0], plan.format)
    if plan.format == "llama":
        calls = "call\ncall: %json " + json.dumps(schema)
    else:
        several = plan.parallel and plan.choice in ("auto", "required")
        calls = ("call (\"\\n\" call)*" if several else "call") + \
            f"\ncall: {json.dumps(OPEN)} %json {json.dumps(schema)} {json.dumps(CLOSE)}"
    if plan.choice != "auto":
        return f"start: {calls}\n"
    opening = "\\{" if plan.format == "llama" else "<tool_call>"
    # Text that does not begin as a call does (leading whitespace included).
    return f"start: TEXT | {calls}\nTEXT: /(.|\\n)*/ & ~/\\s*{opening}(.|\\n)*/\n"


def _pattern(plan: ToolPlan) -> str | None:
    """The plan's grammar as one regex, which the engine compiles to a token DFA on the device (the
    same language as _lark's, arguments as outlines-core writes their schemas: one optional space
    around ':' and ','); None when an argument schema has no regular form or the regex would be
    too long to compile there (then _lark's grammar goes to llguidance's host masks)."""
    functions = [f for f in plan.functions if plan.choice in ("auto", "required", f["name"])]
    args = "parameters" if plan.format == "llama" else "arguments"
    bodies = []
    for f in functions:
        try:
            arguments = regex_for_schema(f.get("parameters", {"type": "object", "properties": {}}))
        except NotRegular:
            return None
        name = f["name"].replace(".", r"\.")  # names are letters, digits, '_', '.' and '-'
        bodies.append(rf'\{{"name": "{name}", "{args}": {arguments}\}}')
    call = bodies[0] if len(bodies) == 1 else "(" + "|".join(f"({b})" for b in bodies) + ")"
    if plan.format == "llama":
        calls, opening = call, "{"
    else:
        call = r"<tool_call>\n" + call + r"\n</tool_call>"
        several = plan.parallel and plan.choice in ("auto", "required")
        calls, opening = (f"{call}(\\n{call})*" if several else call), "<tool_call>"
    pattern = calls if plan.choice != "auto" else f"({_not_starting_with(opening)})|({calls})"
    return pattern if len(pattern) <= MAX_PATTERN_CHARS else None


def _not_starting_with(literal: str) -> str:
    """A regex of the text that does not begin, after any whitespace, with `literal` (plain text
    of a tool plan's "auto"): only whitespace, or a first other character that differs from the
    literal's, or a proper prefix of it, or one that parts from it later."""
    any_text = r"(.|\n)*"
    rest = ""  # past the literal's last character: nothing may follow a whole literal
    for i in range(len(literal) - 1, 0, -1):
        char = re.escape(literal[i])
        rest = f"(|[^{char}]{any_text}" + (f"|{char}{rest})" if rest else ")")
    first = re.escape(literal[0])
    return rf"\s*(|[^\s{first}]{any_text}" + (f"|{first}{rest})" if rest else ")")


def tool_prompt(plan: ToolPlan) -> str:
    """vibee's system message for a template that does not render tools."""
    listing = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in plan.functions)
    return ("You may call functions to answer. They are listed here, one JSON schema a line:\n"
            f"<tools>\n{listing}\n</tools>\n"
            "To call one, answer with a JSON object of its name and arguments inside tags, and nothing else:\n"
            "<tool_call>\n{\"name\": <function name>, \"arguments\": <arguments object>}\n</tool_call>")


def call_text(tool_calls: list[dict[str, Any]], fmt: str) -> str:
    """An assistant message's earlier tool_calls as the model wrote them (for a template that does
    not render tool_calls itself)."""
    parts = []
    for call in tool_calls:
        function = call.get("function", {}) if isinstance(call, dict) else {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except (TypeError, json.JSONDecodeError):
            arguments = function.get("arguments")
        body = json.dumps({"name": function.get("name"), "parameters" if fmt == "llama" else "arguments": arguments},
                          ensure_ascii=False)
        parts.append(body if fmt == "llama" else f"{OPEN}{body}{CLOSE}")
    return "\n".join(parts)
