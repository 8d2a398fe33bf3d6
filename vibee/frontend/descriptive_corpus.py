"""A seeded generator of specs in the older, descriptive style, as people wrote them by hand:
banner comments, a header, `creation_pattern:`, constants with trailing comments, `types:` as a
mapping or as a list of `- name:` entries (fields as `name: Type` or `- name: / type:`, some in
flow style), `behaviors:` with given/when/then in every quoting style, `test_cases:` with flow
`input:` / `expected:`, long descriptions ('|', '>', plain with colons, wrapped over lines), keys like `D&C` or
`Key Points`, `[]u32` types, embedded `\"\"\"` code, blank lines with stray blanks, CRLF files.

`descriptive_spec(rng)` returns the text and the value it must parse to, so the corpus measures
both that such files parse (`vibee bench parse`) and that they parse to what was meant (tests).
"""

from __future__ import annotations

import random
import re

WORDS = ("cache block token layer head query key value batch sequence request prefix kernel tile page "
         "scale group weight memory stream agent model phi trinity vector hash index score buffer").split()
PHRASES = ("Valid input", "Cache is warm", "User's \"query\" arrives", "Return value: the cached KV",
           "Возвращает результат (формат: 0xMMmmpp)", "φ² + 1/φ² = 3", "Two panels (φ : 1)",
           "50% of blocks are free", "input -> output", "a, b and c", "score > 0.5 & mask == 1",
           "O(n log n) time", "the #1 priority", "Returns [ok] or error", "see https://example.org/a?b=c")
TYPES = ("Int", "Float", "String", "Bool", "List<Int>", "Option<String>", "Map<String, Int>", "[]u32",
         "?String", "[3]f64", "[]const u8", "u64", "i32", "f32", "Tensor[B, H, D]")
LANGUAGES = ("zig", "python", "torch", "triton", "rust", "999")
SPECIAL_KEYS = ("D&C", "Key Points", "r&d", "speedup (x)", "PRE", "HSH")
BANNER = "# " + "═" * 77
_RESOLVES = re.compile(r"(?i)true|false|null|~|[-+.0-9].*")


class _Writer:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)

    def maybe_blank(self, indent: str = "", p: float = 0.3) -> None:
        if self.rng.random() < p:
            self.add(self.rng.choice(["", "", indent, indent + "# " + self.words(3)]))

    def words(self, n: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(n))

    def text(self) -> str:
        """A one-line phrase or sentence, as hand-written values are."""
        r = self.rng.random()
        if r < 0.4:
            return self.rng.choice(PHRASES)
        if r < 0.8:
            return self.words(self.rng.randint(1, 6)).capitalize()
        return self.words(self.rng.randint(6, 14)).capitalize() + "."

    @staticmethod
    def plain_ok(value: str, *, in_item: bool = False) -> bool:
        """Whether `value` written plain reads back as itself."""
        return bool(value and value[0] not in "-?:,[]{}#&*!|>'\"%@`" and " #" not in value
                    and not _RESOLVES.fullmatch(value) and value == value.strip()
                    and not (in_item and ": " in value) and not value.endswith(":"))

    def scalar(self, value: str, *, in_item: bool = False) -> str:
        """One spelling of a string value on a line: plain where it stays itself, else quoted."""
        r = self.rng.random()
        if self.plain_ok(value, in_item=in_item) and r < 0.6:
            return value
        if "'" not in value and r < 0.8:
            return "'" + value + "'"
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    def long_text(self, key: str, indent: str) -> str:
        """A description: '|', '>' or one long line; returns the parsed value."""
        lines = [self.text() for _ in range(self.rng.randint(2, 5))]
        style = self.rng.choice(["|", ">", "line", "wrapped"])
        if style == "wrapped" and all(self.plain_ok(line) and ": " not in line for line in lines):
            value = " ".join(lines)  # plain text wrapped by hand: the lines fold with spaces
            self.add(f"{indent}{key}: {lines[0]}")
            self.lines.extend(f"{indent}  {line}" for line in lines[1:])
            return value
        if style in ("line", "wrapped"):
            value = " ".join(lines)
            self.add(f"{indent}{key}: {self.scalar(value)}")
            return value
        self.add(f"{indent}{key}: {style}")
        body = []
        for i, line in enumerate(lines):
            self.add(f"{indent}  {line}")
            body.append(line)
            if i < len(lines) - 1 and self.rng.random() < 0.2:
                self.add("")
                body.append("")
        if style == "|":
            return "\n".join(body) + "\n"
        folded, previous_blank = "", False
        for line in body:
            if line == "":
                folded += "\n"
                previous_blank = True
                continue
            folded += ("" if not folded or previous_blank else " ") + line
            previous_blank = False
        return folded + "\n"


def _header(w: _Writer, doc: dict, name: str) -> None:
    if w.rng.random() < 0.6:
        w.add(BANNER)
        w.add(f"# {name.upper().replace('_', ' ')} - {w.words(4)}")
        w.add(f"# Автор: {w.words(2)}  |  PAS DAEMON: PRE + HSH")
        w.add(BANNER)
        w.add("")
    version = f"{w.rng.randint(1, 999)}.{w.rng.randint(0, 9)}.0"
    doc.update(name=name, version=version, language=w.rng.choice(LANGUAGES), module=name)
    w.add(f"name: {name}")
    w.add(f'version: "{version}"')
    w.add(f"language: {w.scalar(doc['language'])}")
    w.add(f"module: {name}")
    if w.rng.random() < 0.8:
        doc["description"] = w.long_text("description", "")
    w.maybe_blank()


def _creation_pattern(w: _Writer, doc: dict) -> None:
    parts = {k: w.words(1).capitalize() + w.rng.choice(["Input", "Handler", "Result"]) for k in
             ("source", "transformer", "result")}
    doc["creation_pattern"] = parts
    w.add("creation_pattern:")
    for k, v in parts.items():
        w.add(f"  {k}: {v}")
    w.maybe_blank()


def _constants(w: _Writer, doc: dict) -> None:
    section = w.rng.choice(["constants", "sacred_constants", "pas_analysis"])
    values: dict = {}
    w.add(f"{section}:")
    for _ in range(w.rng.randint(2, 6)):
        key = w.rng.choice(SPECIAL_KEYS) if w.rng.random() < 0.3 else w.words(1) + "_" + w.words(1)
        if key in values:
            continue
        value = w.rng.choice([1.618033988749895, 3, 999, 0.0618, 27, -1])
        values[key] = value
        comment = f"  # {w.text()}" if w.rng.random() < 0.4 else ""
        w.add(f"  {key}: {value!r}{comment}")
        w.maybe_blank("  ", 0.15)
    doc[section] = values


def _types(w: _Writer, doc: dict) -> None:
    names = sorted({w.words(1).capitalize() + w.rng.choice(["State", "Config", "Result", "Stats"])
                    for _ in range(w.rng.randint(1, 4))})
    w.add("types:")
    as_list = w.rng.random() < 0.4
    out: list | dict = [] if as_list else {}
    for name in names:
        fields = {f"{w.words(1)}_{i}": w.rng.choice(TYPES) for i in range(w.rng.randint(1, 5))}
        if as_list:
            out.append({"name": name, "fields": [{"name": k, "type": t} for k, t in fields.items()]})
            w.add(f"  - name: {name}")
            w.add("    fields:")
            for k, t in fields.items():
                w.add(f"      - name: {k}")
                w.add(f"        type: {t if w.rng.random() < 0.7 or ',' in t else w.scalar(t)}")
        elif w.rng.random() < 0.2 and all(t[0].isalpha() and "," not in t for t in fields.values()):
            out[name] = {"fields": fields}
            w.add(f"  {name}: {{ fields: {{ {', '.join(f'{k}: {t}' for k, t in fields.items())} }} }}")
        else:
            out[name] = {"fields": fields}
            w.add(f"  {name}:")
            w.add("    fields:")
            for k, t in fields.items():
                w.add(f"      {k}: {t}")
        w.maybe_blank("  ")
    doc["types"] = out


def _flow_case(w: _Writer) -> tuple[str, dict]:
    entries = {w.words(1): w.rng.choice([32, 128, 2.0, "fp16", True, [1, 17, 130]]) for _ in range(w.rng.randint(1, 3))}

    def spell(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(map(str, v)) + "]"
        return w.scalar(v) if isinstance(v, str) else repr(v)

    return "{ " + ", ".join(f"{k}: {spell(v)}" for k, v in entries.items()) + " }", entries


def _test_cases(w: _Writer, indent: str) -> list:
    cases = []
    for i in range(w.rng.randint(1, 3)):
        case = {"name": f"test_{w.words(1)}_{i}"}
        w.add(f"{indent}- name: {case['name']}")
        for part in ("input", "expected"):
            text, value = _flow_case(w)
            case[part] = value
            w.add(f"{indent}  {part}: {text}")
        cases.append(case)
    return cases


def _behaviors(w: _Writer, doc: dict) -> None:
    w.add("behaviors:")
    out = []
    for i in range(w.rng.randint(1, 6)):
        b = {"name": f"{w.words(1)}_{w.words(1)}_{i}"}
        w.add(f"  - name: {b['name']}")
        capital = w.rng.random() < 0.15
        for part in ("given", "when", "then"):
            key = part.capitalize() if capital else part
            b[key] = w.text()
            w.add(f"    {key}: {w.scalar(b[key])}")
        if w.rng.random() < 0.2:
            b["implementation"] = w.long_text("implementation", "    ")
        if w.rng.random() < 0.3:
            w.add("    test_cases:")
            b["test_cases"] = _test_cases(w, "      ")
        out.append(b)
        w.maybe_blank("  ")
    doc["behaviors"] = out


def _extras(w: _Writer, doc: dict) -> None:
    if w.rng.random() < 0.4:
        tags = [w.words(w.rng.randint(1, 3)) for _ in range(w.rng.randint(1, 4))]
        doc["tags"] = tags
        if w.rng.random() < 0.5:
            w.add("tags: [" + ", ".join(tags) + "]")
        else:
            w.add("tags:")
            w.add("\n".join(f"  - {t}" for t in tags))
    if w.rng.random() < 0.15:
        code = f"const std = @import(\"std\");\n\npub fn {w.words(1)}() void {{\n    return;\n}}\n"
        doc["ⲍⲓⲅ_ⲟⲩⲧⲡⲩⲧ"] = code
        w.add('ⲍⲓⲅ_ⲟⲩⲧⲡⲩⲧ: """')
        w.add(code + '"""')


def descriptive_spec(rng: random.Random) -> tuple[str, dict]:
    """One older-style spec: its text and the value it parses to."""
    w, doc = _Writer(rng), {}
    _header(w, doc, f"{rng.choice(WORDS)}_{rng.choice(WORDS)}_v{rng.randint(1, 9999)}")
    sections = [_creation_pattern, _constants, _types, _behaviors]
    for section in sections:
        if section is _behaviors or rng.random() < 0.7:
            if rng.random() < 0.3:
                w.add(BANNER)
                w.add(f"# {section.__name__.strip('_').upper()}")
                w.add(BANNER)
            section(w, doc)
    if rng.random() < 0.5:
        w.add("test_cases:")
        doc["test_cases"] = _test_cases(w, "  ")
    _extras(w, doc)
    text = "\n".join(w.lines) + rng.choice(["\n", "\n\n", "", "\n# end\n"])
    if rng.random() < 0.05:
        text = text.replace("\n", "\r\n")
    return text, doc


def descriptive_corpus(count: int, seed: int = 0) -> list[tuple[str, dict]]:
    rng = random.Random(seed)
    return [descriptive_spec(rng) for _ in range(count)]
