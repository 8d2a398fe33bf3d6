"""The built-in default models (models/vibee-tiny and its draft) and the script that trains them."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "train_default_model.py"
TARGET = ROOT / "models" / "vibee-tiny"
DRAFT = ROOT / "models" / "vibee-tiny-draft"
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md")


def _training(name: str):
    """A module of scripts/training/, imported the way the script imports it (loading the script
    puts scripts/ on sys.path)."""
    spec = importlib.util.spec_from_file_location("train_default_model", SCRIPT)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    return importlib.import_module(f"training.{name}")


def _stats() -> dict:
    return json.loads((TARGET / "training_stats.json").read_text())


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.fixture(scope="module")
def target_model():
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(str(TARGET))
    return model.to(torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(str(TARGET / "tokenizer.json"))


@pytest.mark.parametrize("model_dir", [TARGET, DRAFT], ids=["target", "draft"])
def test_model_dir_has_hugging_face_files(model_dir):
    missing = [name for name in REQUIRED if not (model_dir / name).is_file()]
    assert not missing, f"{model_dir} lacks {missing}"


def test_both_models_fit_in_30_mb():
    total = sum(p.stat().st_size for d in (TARGET, DRAFT) for p in d.iterdir() if p.is_file())
    assert total <= 30 * 1000 * 1000, f"{total / 1e6:.1f} MB"


def test_configs_are_llama_with_head_dim_64_and_the_draft_is_much_smaller():
    target, draft = _config(TARGET), _config(DRAFT)
    for config in (target, draft):
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert config["head_dim"] == 64 == config["hidden_size"] // config["num_attention_heads"]
        assert config["num_attention_heads"] % config["num_key_value_heads"] == 0
        assert config["tie_word_embeddings"] is True
        assert config["torch_dtype"] == "bfloat16"
    assert target["vocab_size"] == draft["vocab_size"]
    stats = _stats()
    assert stats["draft"]["params"] * 5 < stats["target"]["params"]


def test_target_and_draft_share_one_tokenizer():
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (TARGET / name).read_bytes() == (DRAFT / name).read_bytes(), name
    config = json.loads((TARGET / "tokenizer_config.json").read_text())
    assert config["bos_token"] == config["eos_token"] == "<|endoftext|>"
    assert "<|im_start|>" in config["chat_template"]


def test_tokenizer_round_trips_python_source(tokenizer):
    source = (
        'class Point:\n    """A point, café ∑ 🐍."""\n\n'
        "    def __init__(self, x: int = 0, *args, **kw) -> None:\n"
        "\tself.x = x  # tab-indented\r\n        return {'a': [1, 2.5e-3]}\n"
    )
    ids = tokenizer.encode(source, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == source
    assert len(ids) < len(source.encode("utf-8")) / 2  # BPE merges common Python
    assert [tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tokenizer.encode("import os").ids[0] == 0  # BOS in front when special tokens are added


def test_card_states_perplexities_agreement_and_command():
    stats, card = _stats(), (TARGET / "README.md").read_text()
    held_out = stats["held_out"]
    vocab = _config(TARGET)["vocab_size"]
    assert 1 < held_out["target_perplexity"] < held_out["draft_perplexity"] < vocab
    assert 0 < held_out["greedy_agreement"] < 1
    assert not stats["quick"]
    for figure in (str(held_out["target_perplexity"]), str(held_out["draft_perplexity"]),
                   f"{held_out['greedy_agreement'] * 100:.1f}%", stats["reproduce_command"]):
        assert figure in card, figure
    assert str(held_out["draft_perplexity"]) in (DRAFT / "README.md").read_text()


def test_target_perplexity_on_held_out_files_matches_the_card(target_model, tokenizer):
    # The card's held-out files as this machine's stdlib has them (its Python version may differ
    # from the training machine's, hence the loose factor): the first 512 tokens of each.
    corpus, token_stream, stats = _training("corpus"), _training("token_stream"), _stats()
    root = corpus.stdlib_root()
    rels = [rel for rel in stats["data"]["held_out_files"] if (root / rel).is_file()]
    assert len(rels) >= 3, f"too few of the card's held-out files under {root}: {rels}"
    rows = []
    for rel in rels:
        stream = token_stream.encode_stream(tokenizer, [(root / rel).read_text(encoding="utf-8")])
        rows.append(token_stream.windows(stream[:513], 512)[0])
    windows = torch.stack(rows)
    with torch.no_grad():
        logits = target_model(input_ids=windows[:, :-1].clamp(min=0)).logits.float()
    targets = windows[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    perplexity = math.exp(nll.item())
    card = stats["held_out"]["target_perplexity"]
    assert card / 2 < perplexity < card * 2, (perplexity, card)
    assert perplexity < _config(TARGET)["vocab_size"] / 20  # far below a uniform guess


@pytest.mark.parametrize("prompt,pattern", [
    ("def ", r"def [A-Za-z_]\w*\("),  # a function name, then its parameters
    ("import ", r"import [A-Za-z_][\w.]*"),
])
def test_target_greedy_continuation_reads_as_python(target_model, tokenizer, prompt, pattern):
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    with torch.no_grad():
        out = target_model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0,
                                    attention_mask=torch.ones_like(ids))
    text = tokenizer.decode(out[0].tolist(), skip_special_tokens=True)
    assert re.match(pattern, text), text
    assert "\ufffd" not in text, text  # no broken UTF-8 pieces


@pytest.mark.slow
def test_quick_training_runs_end_to_end(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("vibee-tiny", "vibee-tiny-draft"):
        for file in REQUIRED:
            assert (tmp_path / name / file).is_file(), f"{name}/{file}"
    stats = json.loads((tmp_path / "vibee-tiny" / "training_stats.json").read_text())
    assert stats["quick"] and stats["target"]["train"]["steps"] == 3
    assert math.isfinite(stats["held_out"]["target_perplexity"])
    assert 0 <= stats["held_out"]["greedy_agreement"] <= 1


def test_script_rejects_a_context_longer_than_the_models(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--seq-len", "4096", "--device", "cpu", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --seq-len 4096 is over the models' context of 1024 tokens"]
