"""The model's tokenizer: `tokenizer.json` through the `tokenizers` library, special tokens and
the chat template from `tokenizer_config.json` (or `chat_template.jinja` / `chat_template.json`,
where newer transformers save it).

Chat templates are Jinja run in a sandbox (a model directory is untrusted input) with what
Hugging Face templates expect: `messages`, `add_generation_prompt`, `bos_token`, `eos_token`
and the other special tokens, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII,
the `loopcontrols` extension and `{% generation %}` blocks. The rendered prompt already holds
whatever special tokens the template writes, so encode it with add_special_tokens=False.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from vibee.runtime.model_config import LoadError

# Used when the model directory has no chat template: ChatML, which many small models know.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """A chat request the template can't render (bad messages, or the template's raise_exception)."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks assistant text with it to build
    training masks; rendering a prompt just keeps the text."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _flatten_messages(messages: Any) -> list[dict]:
    """Copies of the messages whose content is a string: text parts joined by newlines."""
    if not isinstance(messages, list):
        raise ChatTemplateError(f"messages must be a list, got {type(messages).__name__}")
    flat = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"messages[{i}] must be an object with a string 'role'")
        message = dict(message)
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ChatTemplateError(f"messages[{i}].content[{j}]: only text parts are supported, got {kind!r}")
                texts.append(part["text"])
            message["content"] = "\n".join(texts)
        elif content is None:
            message["content"] = ""
        elif not isinstance(content, str):
            raise ChatTemplateError(f"messages[{i}].content must be a string or a list of text parts")
        flat.append(message)
    return flat


class Tokenizer:
    """encode/decode and chat templates for one model directory."""

    def __init__(self, tokenizer: HFTokenizer, tokenizer_config: dict | None = None, chat_template: str | None = None,
                 source: str = "tokenizer_config.json"):
        self._tok = tokenizer
        cfg = tokenizer_config or {}
        self.tokenizer_config = cfg
        self.special_tokens: dict[str, str] = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            text = _token_text(cfg.get(key))
            if text is not None:
                self.special_tokens[key] = text
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.bos_token_id = tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        eos_id = tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        self.eos_token_ids: set[int] = {eos_id} if eos_id is not None else set()
        added = tokenizer.get_added_tokens_decoder()
        self.all_special_ids: set[int] = {i for i, tok in added.items() if tok.special}
        self.all_special_ids |= {i for i in (self.bos_token_id, eos_id) if i is not None}
        self._fix_bos(cfg.get("add_bos_token"))
        self.chat_template_source = source
        self.has_chat_template = chat_template is not None
        self._template_text = chat_template or FALLBACK_CHAT_TEMPLATE
        try:
            self._template = _environment().from_string(self._template_text)
        except jinja2.exceptions.TemplateSyntaxError as err:
            raise LoadError(f"{source}: chat_template has a syntax error on line {err.lineno}: {err.message}") from None

    # Pickled to the server process (the engine runs in a process of its own): a compiled
    # template does not pickle, its source does.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_template"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._template = _environment().from_string(self._template_text)

    def _fix_bos(self, add_bos: Any) -> None:
        """tokenizer_config.json's add_bos_token overrides what tokenizer.json's post-processor does,
        as transformers' Llama tokenizers do."""
        self._prepend_bos = self._strip_bos = False
        if self.bos_token_id is None or not isinstance(add_bos, bool):
            return
        adds = self._tok.encode("a", add_special_tokens=True).ids[:1] == [self.bos_token_id]
        self._prepend_bos = add_bos and not adds
        self._strip_bos = adds and not add_bos

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Read tokenizer.json (required), tokenizer_config.json and a chat template file (optional)."""
        path = Path(path)
        tok_path = path / "tokenizer.json"
        if not tok_path.is_file():
            raise LoadError(f"{tok_path}: missing (the model directory needs a tokenizers tokenizer.json)")
        try:
            tokenizer = HFTokenizer.from_file(str(tok_path))
        except Exception as err:  # tokenizers raises plain Exceptions with multi-line text
            raise LoadError(f"{tok_path}: not a valid tokenizer file ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
        cfg_path = path / "tokenizer_config.json"
        cfg = read_json(cfg_path) if cfg_path.is_file() else {}
        template, source = _find_chat_template(path, cfg, cfg_path)
        return cls(tokenizer, cfg, template, source)

    # -- tokens ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template_text(self) -> str:
        """The chat template's source (the fallback's when the model has none)."""
        return self._template_text

    def tokenizer_json(self) -> str:
        """The tokenizer as tokenizer.json text (what llguidance builds its token trie from)."""
        return self._tok.to_str()

    # tokenizers' encode() holds the GIL for the whole text (2 s for 2 MB here); encode_batch()
    # releases it, so a long prompt tokenized in a server thread doesn't stall the event loop.
    LONG_TEXT = 8192

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > self.LONG_TEXT:
            ids = self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        else:
            ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._prepend_bos:
            ids = [self.bos_token_id, *ids]
        elif add_special_tokens and self._strip_bos and ids[:1] == [self.bos_token_id]:
            ids = ids[1:]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # -- chat -----------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text for a chat. Extra keyword arguments (tools, documents, template
        switches such as enable_thinking) reach the template as variables. Raises
        ChatTemplateError for malformed messages or when the template calls raise_exception."""
        context = {**self.special_tokens, **kwargs, "messages": _flatten_messages(messages),
                   "add_generation_prompt": add_generation_prompt}
        try:
            return self._template.render(**context)
        except jinja2.exceptions.TemplateError as err:
            raise ChatTemplateError(f"chat template: {err.message or type(err).__name__}") from None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise LoadError(f"{path}: cannot be read ({err.__class__.__name__}: {err})") from None
    except json.JSONDecodeError as err:
        raise LoadError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None


def _find_chat_template(path: Path, cfg: Any, cfg_path: Path) -> tuple[str | None, str]:
    if not isinstance(cfg, dict):
        raise LoadError(f"{cfg_path}: expected a JSON object")
    template = cfg.get("chat_template")
    source = str(cfg_path)
    if template is None and (path / "chat_template.jinja").is_file():
        source = str(path / "chat_template.jinja")
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    elif template is None and (path / "chat_template.json").is_file():
        source = str(path / "chat_template.json")
        data = read_json(path / "chat_template.json")
        template = data.get("chat_template") if isinstance(data, dict) else None
        if template is None:
            raise LoadError(f"{source}: no 'chat_template' key")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise LoadError(f"{source}: chat_template is a list without a 'default' template")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise LoadError(f"{source}: chat_template must be a string")
    return template, source
