from __future__ import annotations

import functools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from vibee.runtime.detokenizer import MAX_HELD_TOKENS, PROMPT_CONTEXT_TOKENS, IncrementalDetokenizer

FFFD = "\ufffd"
CORPUS = [
    "Héllo wörld! café naïve façade 😀🎉 日本語のテキスト 中文字符 ñandú — “quotes” 🚀 emoji 👍🏽 ok",
    "The quick brown fox 狐狸 jumps über the lazy dog 🐶. Ça va? Größe, 東京, 😂😂",
] * 20
# Characters of 1, 2, 3 and 4 UTF-8 bytes, some seen in training (merged) and some not (raw bytes).
ALPHABET = "ab éüñçØ日本語中文狐東京字 😀🎉🚀🐶👍🏽🦀\n"


class Adapter:
    """The only tokenizer surface the detokenizer needs."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.longest_decode = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.longest_decode = max(self.longest_decode, len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids


@functools.cache
def byte_level() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|end|>"], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@functools.cache
def metaspace() -> Tokenizer:
    """SentencePiece-like: '▁' marks spaces and the decoder drops the first token's leading space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>"], show_progress=False)
    tok.train_from_iterator(["Hello world, café naïve. The quick brown fox jumps over the lazy dog."] * 10, trainer)
    return tok


def stream(tok, prompt: list[int], output: list[int], skip_special_tokens: bool = True) -> tuple[IncrementalDetokenizer, list[str]]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special_tokens)
    return detok, [detok.add(t) for t in output]


def byte_token(b: int) -> int:
    """The id of the single-byte token for byte b (GPT-2's byte -> printable character map)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if b in printable:
        char = chr(b)
    else:
        char = chr(256 + sorted(set(range(256)) - set(printable)).index(b))
    return byte_level().token_to_id(char)


def test_vocab_really_splits_characters():
    tok = byte_level()
    # Many single tokens hold part of a character: the hold-back is exercised.
    assert sum(FFFD in tok.decode([i]) for i in range(tok.get_vocab_size())) > 50
    assert tok.decode([byte_token(b) for b in "🦀".encode()]) == "🦀"
    assert all(tok.decode([byte_token(b)]) == FFFD for b in "🦀".encode())


def test_character_split_over_byte_tokens_is_emitted_whole():
    a = Adapter(byte_level())
    ids = a.encode("x") + [byte_token(b) for b in "🦀".encode()] + a.encode("y")
    detok, deltas = stream(a, [], ids)
    assert deltas == ["x", "", "", "", "🦀", "y"]
    assert detok.text == "x🦀y" and detok.token_ids == ids
    # Same with the character's bytes arriving after the prompt ends mid-character.
    detok, deltas = stream(a, ids[:2], ids[2:])
    assert deltas == ["", "", "🦀", "y"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(st.sampled_from(ALPHABET), max_size=40), cut=st.integers(0, 100))
def test_valid_text_streams_exactly(text, cut):
    """Token streams of real UTF-8 text: deltas join to the decode and never carry U+FFFD.

    The prompt/output cut is at any token, so it may fall inside a character: that character
    belongs to the output, which completes it."""
    a = Adapter(byte_level())
    ids = a.encode(text)
    k = cut % (len(ids) + 1)
    prompt, output = ids[:k], ids[k:]
    detok, deltas = stream(a, prompt, output)
    prompt_text = a.decode(prompt).rstrip(FFFD)
    full = a.decode(ids)
    assert FFFD not in full
    assert full.startswith(prompt_text)
    assert "".join(deltas) == full[len(prompt_text) :] == detok.text
    assert all(FFFD not in d for d in deltas)
    assert detok.flush() == ""


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt_text=st.text(st.sampled_from(ALPHABET), max_size=12),
    output=st.lists(st.integers(0, byte_level().get_vocab_size() - 1), max_size=40),
)
def test_random_token_streams_emit_only_settled_text(prompt_text, output):
    """Any token ids, valid UTF-8 or not: after every token the text is exactly the decode so far
    minus a trailing run of U+FFFD (a character possibly still arriving), and flush adds that run."""
    a = Adapter(byte_level())
    prompt = a.encode(prompt_text)
    detok = IncrementalDetokenizer(a, prompt)
    base = a.decode(prompt)
    for i, t in enumerate(output):
        detok.add(t)
        so_far = a.decode(prompt + output[: i + 1])
        assert so_far.startswith(base)
        assert detok.text == so_far[len(base) :].rstrip(FFFD)
    detok.flush()
    assert detok.text == a.decode(prompt + output)[len(base) :]


def test_garbage_run_keeps_decode_windows_bounded():
    a = Adapter(byte_level())
    lone = byte_token(0x80)  # a continuation byte on its own: never completes a character
    start = byte_token(0xF0)  # a 4-byte lead: always waits for more
    output = [lone] * 300 + [start]
    detok, deltas = stream(a, a.encode("hi"), output)
    assert a.longest_decode <= 2 * MAX_HELD_TOKENS + PROMPT_CONTEXT_TOKENS
    detok.flush()
    assert detok.text == FFFD * 301


def test_leading_space_kept_with_sentencepiece_style_decoder():
    a = Adapter(metaspace())
    ids = a.encode("Hello world café")
    prompt, output = ids[:1], ids[1:]
    # Decoding the output alone loses the space between prompt and output...
    assert not a.decode(output).startswith(" ")
    # ...the detokenizer keeps it, because it decodes with the prompt as context.
    detok, deltas = stream(a, prompt, output)
    assert detok.text == " world café"
    assert "".join(deltas) == a.decode(ids)[len(a.decode(prompt)) :]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(st.sampled_from("Helo wrdcafé naïvTqukbwnxjmps,."), max_size=40), cut=st.integers(0, 100))
def test_sentencepiece_style_streams(text, cut):
    a = Adapter(metaspace())
    ids = a.encode(text)
    k = cut % (len(ids) + 1)
    detok, deltas = stream(a, ids[:k], ids[k:])
    assert "".join(deltas) == a.decode(ids)[len(a.decode(ids[:k])) :]


def test_no_prompt_starts_from_the_first_token():
    a = Adapter(metaspace())
    ids = a.encode("Hello world")
    detok, _ = stream(a, [], ids)
    assert detok.text == "Hello world"


def test_special_tokens_skipped_or_kept():
    a = Adapter(byte_level())
    end = a.tok.token_to_id("<|end|>")
    out = a.encode("ok") + [end] + a.encode("日本")
    assert stream(a, [], out)[0].text == "ok日本"
    assert stream(a, [], out, skip_special_tokens=False)[0].text == "ok<|end|>日本"


class CleanupTokenizer:
    """A decoder that rewrites text across tokens (" ." -> "."), like clean_up_tokenization_spaces."""

    pieces = ["Hello", " ", ".", " world"]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids).replace(" .", ".")


def test_decoder_rewriting_emitted_text_loses_nothing():
    detok, deltas = stream(CleanupTokenizer(), [], [0, 1, 2, 3])
    # " " was already sent when "." arrived; it can't be taken back, but "." must not be dropped.
    assert deltas == ["Hello", " ", ".", " world"]
    assert detok.text == "Hello . world"
