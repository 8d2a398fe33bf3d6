"""scripts/train_medusa_heads.py and its parts: which token each head learns, which hidden state
it learns from, and a smoke run that writes a heads file the engine's loader accepts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "train_medusa_heads.py"
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

from training.medusa import cache_hidden, head_targets  # noqa: E402


def test_head_i_learns_the_token_i_after_the_targets_next_one():
    stream = torch.arange(100, 110)
    targets = head_targets(stream, torch.tensor([0, 5, 7]), 3)
    assert targets.tolist() == [[102, 103, 104], [107, 108, 109], [109, -1, -1]]


def test_cached_hidden_states_are_the_targets_at_their_stream_positions():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    target = LlamaForCausalLM(config).eval()
    stream = torch.randint(0, 50, (65,))  # 8 full windows of 8 inputs
    hidden, positions = cache_hidden(target, stream, seq_len=8, batch=3, title="test", max_tokens=24)
    assert len(hidden) == len(positions) == 24 and hidden.dtype == torch.bfloat16
    assert positions.max() < len(stream) - 1  # every cached position has a next token to learn from
    with torch.no_grad():
        for window in positions.view(-1, 8)[:, 0].tolist():
            direct = target.model(input_ids=stream[None, window: window + 8]).last_hidden_state[0]
            rows = hidden[(positions >= window) & (positions < window + 8)].float()
            torch.testing.assert_close(rows, direct, rtol=2e-2, atol=2e-2)  # bf16 storage
    every, _ = cache_hidden(target, stream, seq_len=8, batch=3, title="test")
    assert len(every) == len(stream) - 1


@pytest.mark.slow
def test_quick_medusa_training_writes_heads_the_engine_loads(tmp_path):
    from safetensors.torch import load_file

    from vibee.runtime.config import DEFAULT_MODEL_DIR
    from vibee.runtime.generated import load_generated

    out = tmp_path / "heads.safetensors"
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads(out.with_suffix(".json").read_text())
    assert len(stats["held_out"]["head_top1"]) == stats["num_heads"] == 4
    hidden_size = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())["hidden_size"]
    heads = load_generated().speculative_decode.MedusaHeads.from_state_dict(load_file(str(out)), hidden_size)
    assert heads.num_heads == 4
