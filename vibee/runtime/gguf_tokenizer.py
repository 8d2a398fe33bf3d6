"""The tokenizer stored in a GGUF file, as a `tokenizers` Tokenizer that splits text as llama.cpp does.

Two kinds (tokenizer.ggml.model):
- "gpt2": byte-level BPE from the file's tokens and merges, after the split that
  tokenizer.ggml.pre names (GPT-2's, Llama 3's, Qwen2's, SmolLM's).
- "llama": SentencePiece's BPE (Llama 2, Mistral, TinyLlama): tokens with scores and no merges.
  Spaces are "▁", and the text gets one in front (tokenizer.ggml.add_space_prefix, on unless the
  file says otherwise; after a special token too). llama.cpp then joins, again and again, the
  adjacent pair whose joined piece is a token of the highest score (the leftmost of equals).
  Here a BPE does it: its merges are every split of every token into two tokens, ranked by the
  score of the token they make. A character that is no token becomes the <0xXX> tokens of its
  UTF-8 bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from vibee.runtime.model_config import LoadError

# How tokenizer.ggml.pre splits text before byte-level BPE, as llama.cpp's vocabulary loader does:
# GPT-2's split; Llama 3's (digits in runs of up to 3, letters with one leading non-letter, newlines
# apart); Qwen2's (the same with single digits); SmolLM's (single digits, then GPT-2's split).
CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA3_SPLIT = CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")  # llama.cpp's names for Llama 3's split
TOKENIZER_PRE = ("default", "gpt2", *LLAMA3_PRE, "qwen2", "smollm")
SPACE = "\u2581"  # "▁": SentencePiece's space
# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def gguf_tokenizer(get: Callable[..., Any], path: Path):
    """The vibee Tokenizer of a GGUF file's metadata; get(key[, default]) reads a metadata field."""
    from tokenizers import AddedToken

    from vibee.runtime.tokenizer import Tokenizer

    kind = get("tokenizer.ggml.model")
    tokens = list(get("tokenizer.ggml.tokens"))
    types = list(get("tokenizer.ggml.token_type", [NORMAL] * len(tokens)))
    if kind == "gpt2":
        hf = _byte_level_bpe(tokens, get, path)
    elif kind == "llama":
        hf = _sentencepiece_bpe(tokens, types, get, path)
    else:
        raise LoadError(f"{path}: tokenizer {kind!r} is not supported yet (gpt2 and llama are)")
    hf.add_special_tokens([AddedToken(t, special=True) for t, kind in zip(tokens, types) if kind == CONTROL])
    config: dict[str, Any] = {"add_bos_token": bool(get("tokenizer.ggml.add_bos_token", kind == "llama"))}
    for key, field in (("bos_token", "tokenizer.ggml.bos_token_id"), ("eos_token", "tokenizer.ggml.eos_token_id")):
        token_id = get(field, None)
        if token_id is not None:
            config[key] = tokens[int(token_id)]
    return Tokenizer(hf, config, get("tokenizer.chat_template", None), f"{path} (tokenizer.chat_template)")


def _byte_level_bpe(tokens: list[str], get: Callable[..., Any], path: Path):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models

    pre = get("tokenizer.ggml.pre", "default")
    if pre not in TOKENIZER_PRE:
        raise LoadError(f"{path}: tokenizer 'gpt2' with pre-tokenizer {pre!r} is not supported yet "
                        f"(gpt2 with {', '.join(TOKENIZER_PRE)} is)")
    merges = [tuple(m.split(" ", 1)) for m in get("tokenizer.ggml.merges")]
    # Llama 3's tokenizer takes a piece found whole in the vocabulary as it is (as llama.cpp does).
    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                ignore_merges=pre in LLAMA3_PRE))
    hf.pre_tokenizer = pre_tokenizer(pre)
    hf.decoder = decoders.ByteLevel()
    return hf


def _sentencepiece_bpe(tokens: list[str], types: list[int], get: Callable[..., Any], path: Path):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers

    scores = get("tokenizer.ggml.scores", None)
    if scores is None:
        raise LoadError(f"{path}: a 'llama' (SentencePiece) tokenizer needs tokenizer.ggml.scores")
    unknown = next((t for t, kind in zip(tokens, types) if kind == UNKNOWN), None)
    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=sentencepiece_merges(tokens, scores, types),
                                unk_token=unknown, fuse_unk=True, byte_fallback=True))
    prefix = bool(get("tokenizer.ggml.add_space_prefix", True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE)] * prefix + [normalizers.Replace(" ", SPACE)])
    hf.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                   + [decoders.Strip(" ", 1, 0)] * prefix)
    return hf


def sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges that join what llama.cpp's SentencePiece tokenizer joins: each split of a normal
    token into two normal tokens, ranked by the joined token's score (highest first)."""
    normal = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (NORMAL, USER_DEFINED)}
    ranked = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-float(scores[i]), i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def pre_tokenizer(pre: str):
    """The `tokenizers` pre-tokenizer of a tokenizer.ggml.pre name (one of TOKENIZER_PRE)."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre in ("default", "gpt2", "smollm"))
    if pre in (*LLAMA3_PRE, "qwen2"):
        split = Regex(QWEN2_SPLIT if pre == "qwen2" else LLAMA3_SPLIT)
        return pre_tokenizers.Sequence([pre_tokenizers.Split(split, behavior="isolated"), byte_level])
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level
