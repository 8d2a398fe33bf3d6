"""scripts/make_outlier_model.py: the copy computes the same function, with outlier activations
where it scaled, and bad arguments end in a usage error, writing nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.runtime.hf_models import make_model

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

from make_outlier_model import main  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("outlier-source")
    make_model(directory, "llama", hidden=64, heads=4, kv_heads=2, layers=2)
    return directory


def q_proj_inputs(model, ids):
    seen = []
    handle = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        logits = model(ids).logits
    handle.remove()
    return logits, seen[0].abs().mean(dim=(0, 1))


def test_the_copy_computes_the_same_logits_with_outlier_channels(model_dir, tmp_path):
    from transformers import LlamaForCausalLM

    out = tmp_path / "outliers"
    assert main([str(out), "--model", str(model_dir), "--channels", "3", "--factor", "16"]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    before, plain = q_proj_inputs(LlamaForCausalLM.from_pretrained(model_dir).eval(), ids)
    after, scaled = q_proj_inputs(LlamaForCausalLM.from_pretrained(out).eval(), ids)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    ratio = scaled / plain
    assert (ratio > 15).sum() == 3 and torch.allclose(ratio.sort().values[:-3], torch.ones(61), rtol=1e-4)


def test_bad_arguments_are_usage_errors_and_write_nothing(model_dir, tmp_path, capsys):
    for argv, message in ([["--channels", "0"], "--channels must be >= 1"],
                          [["--channels", "65"], "more than the model's width 64"],
                          [["--model", str(tmp_path)], "no such file"]):
        with pytest.raises(SystemExit) as exit_info:
            main([str(tmp_path / "new"), "--model", str(model_dir), *argv] if "--model" not in argv
                 else [str(tmp_path / "new"), *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "new").exists()
    with pytest.raises(SystemExit):
        main([str(model_dir), "--model", str(model_dir)])  # the output exists
    assert "exists" in capsys.readouterr().err
