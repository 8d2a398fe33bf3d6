"""SentencePiece tokenizers in GGUF files (tokenizer.ggml.model "llama": Llama 2, Mistral,
TinyLlama): a small vocabulary with scores, built here by merging frequent pairs as SentencePiece's
BPE trainer does, checked against llama.cpp's algorithm written out below and against
transformers' own reading of the GGUF tokenizer."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from vibee.runtime.gguf_file import GGUFFile

gguf = pytest.importorskip("gguf")

SPACE = "\u2581"
CORPUS = ("the quick brown fox jumps over the lazy dog. the dog sleeps; the fox runs away quickly!\n"
          "then they meet again, and the dog jumps over the fox")
MISSING = "é"  # no token: its UTF-8 bytes' tokens stand in


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types: <unk>, <s>, </s>, the 256 byte tokens, the corpus's characters,
    then the joins of the most frequent adjacent pair, each scored below the one before."""
    seq = list(SPACE + CORPUS.replace(" ", SPACE))
    chars = sorted(set(seq))
    joined: list[str] = []
    for _ in range(80):
        (a, b), count = collections.Counter(zip(seq, seq[1:])).most_common(1)[0]
        if count < 2:
            break
        joined.append(a + b)
        out, i = [], 0
        while i < len(seq):
            if seq[i: i + 2] == [a, b]:
                out.append(a + b)
                i += 2
            else:
                out.append(seq[i])
                i += 1
        seq = out
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + chars + joined
    types = [2, 3, 3] + [6] * 256 + [1] * (len(chars) + len(joined))
    scores = [0.0] * 259 + [-1000.0 - i for i in range(len(chars))] + [-float(i) for i in range(len(joined))]
    # Overlapping pairs whose scores decide: "abc" is "ab" "c", "pqr" is "p" "qr".
    for piece, score in OVERLAPS.items():
        assert piece not in tokens
        tokens.append(piece)
        types.append(1)
        scores.append(score)
    return tokens, scores, types


OVERLAPS = {"ab": 10.0, "bc": -500.0, "pq": -500.0, "qr": 10.0}


def llama_cpp_encode(text: str, tokens: list[str], scores: list[float], prefix: bool = True) -> list[int]:
    """llama.cpp's SentencePiece tokenizer: spaces as "▁" (one in front), characters as symbols;
    join the adjacent pair that makes the highest-scoring token (leftmost of equals) until none
    does; a symbol that is no token becomes its UTF-8 bytes' <0xXX> tokens."""
    ids = {t: i for i, t in enumerate(tokens)}
    symbols = list((SPACE if prefix else "") + text.replace(" ", SPACE))
    while True:
        best = None
        for i in range(len(symbols) - 1):
            j = ids.get(symbols[i] + symbols[i + 1])
            if j is not None and (best is None or scores[j] > best[0]):
                best = (scores[j], i)
        if best is None:
            break
        i = best[1]
        symbols[i: i + 2] = [symbols[i] + symbols[i + 1]]
    out = []
    for s in symbols:
        out += [ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()]
    return out


def write_tokenizer_gguf(path, prefix: bool | None = None) -> tuple[list[str], list[float]]:
    tokens, scores, types = vocabulary()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if prefix is not None:
        writer.add_add_space_prefix(prefix)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tokens, scores


TEXTS = ["the quick fox", "abc pqr", f"H{MISSING}llo the dog  runs\nthen again", " a leading space", "x", "dog.the fox!"]


def test_a_sentencepiece_gguf_tokenizer_encodes_as_llama_cpp_and_transformers(tmp_path):
    from transformers import AutoTokenizer

    path = tmp_path / "spm.gguf"
    tokens, scores = write_tokenizer_gguf(path)
    tokenizer = GGUFFile(path).tokenizer()
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == llama_cpp_encode(text, tokens, scores), text
        assert tokenizer.decode(ids) == text
        if not text.startswith(" "):  # transformers adds no "▁" before one already there; llama.cpp does
            assert ids == hf.encode(text, add_special_tokens=False), text
    assert any(len(tokens[i]) > 2 for i in tokenizer.encode(TEXTS[0], add_special_tokens=False))  # pieces joined
    pieces = [tokens[i] for i in tokenizer.encode("abc pqr", add_special_tokens=False)]
    assert "ab" in pieces and "qr" in pieces and "bc" not in pieces and "pq" not in pieces  # the higher score wins
    assert tokenizer.encode("the", add_special_tokens=True)[0] == tokenizer.bos_token_id == 1  # add_bos by default
    assert tokenizer.eos_token_ids == {2}


def test_without_the_space_prefix_nothing_is_put_in_front(tmp_path):
    path = tmp_path / "spm.gguf"
    tokens, scores = write_tokenizer_gguf(path, prefix=False)
    tokenizer = GGUFFile(path).tokenizer()
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == llama_cpp_encode(text, tokens, scores, prefix=False), text
        assert tokenizer.decode(ids) == text


def test_an_unknown_tokenizer_model_is_named(tmp_path):
    from vibee.runtime.loader import LoadError

    path = tmp_path / "spm.gguf"
    write_tokenizer_gguf(path)
    file = GGUFFile(path)
    file.fields["tokenizer.ggml.model"] = "bert"
    with pytest.raises(LoadError, match="tokenizer 'bert' is not supported yet"):
        file.tokenizer()
