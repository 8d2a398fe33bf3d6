"""The engine's flags: one option per knob that a kind's config model declares with `flag=`
(names, aliases, help from the declaration), the vLLM spellings and every flag the README
documents still accepted, and a rejected value reported by the config model, naming the flag."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from vibee.bench.cli import bench
from vibee.cli import main
from vibee.engine_flags import KNOB_FLAGS, split_flags
from vibee.kinds.registry import KIND_NAMES, config_model

README = Path(__file__).resolve().parents[1] / "README.md"
COMMANDS = {"serve": main.commands["serve"], "bench throughput": bench.commands["throughput"]}


def declared_flags() -> list[tuple[str, str, dict]]:
    return [(kind, field, info.json_schema_extra) for kind in KIND_NAMES
            for field, info in config_model(kind).model_fields.items()
            if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("flag")]


def parse(command: str, args: list[str]) -> tuple[dict, dict]:
    """(engine settings, knob settings) the command's flags give for args."""
    ctx = COMMANDS[command].make_context(command, list(args))
    return split_flags(ctx.params)


def test_the_kinds_declare_the_vllm_flags():
    flags = {extra["flag"] for _, _, extra in declared_flags()}
    assert {"--block-size", "--max-num-seqs", "--max-num-batched-tokens", "--num-speculative-tokens",
            "--enable-prefix-caching", "--gpu-memory-utilization", "--tensor-parallel-size"} <= flags


@pytest.mark.parametrize("command", COMMANDS)
def test_every_declared_knob_flag_is_an_option_with_the_fields_help(command):
    options = {name: p for p in COMMANDS[command].params for name in p.opts}
    assert {param for param, _ in KNOB_FLAGS.items()} == {p.name for p in COMMANDS[command].params} & set(KNOB_FLAGS)
    for kind, field, extra in declared_flags():
        option = options[extra["flag"]]
        assert set(extra["aliases"]) <= set(option.opts)
        assert option.help.startswith(config_model(kind).model_fields[field].description)
        assert KNOB_FLAGS[option.name] == (kind, field)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_knob_flag_sets_its_kinds_field_and_unset_ones_are_left_to_the_spec(command):
    settings, knobs = parse(command, ["--block-size", "32", "--batch-size", "3", "-tp", "1",
                                      "--no-enable-prefix-caching", "--scheduling-policy", "priority"])
    assert knobs == {"kv_cache": {"block_size": 32, "enable_prefix_caching": False},
                     "continuous_batch": {"max_num_seqs": 3, "policy": "priority"},
                     "tensor_parallel": {"tp_size": 1}}
    assert not set(settings) & set(KNOB_FLAGS)
    assert parse(command, [])[1] == {}


def _readme_flags() -> list[str]:
    """The flags of README's `vibee serve` flag table."""
    text = README.read_text()
    table = text[text.index("| flag | what |"):]
    table = table[: table.index("\n\n")]
    return sorted(set(re.findall(r"`(--[a-z][a-z-]*)", table)))


def test_every_flag_the_readme_documents_is_accepted_by_serve():
    serve = COMMANDS["serve"]
    known = {opt for p in serve.params for opt in (*p.opts, *p.secondary_opts)}
    documented = _readme_flags()
    assert "--batch-size" in documented and "--block-size" in documented
    assert [f for f in documented if f not in known] == []


def test_every_declared_knob_flag_is_in_the_readme():
    documented = set(_readme_flags())
    assert [extra["flag"] for _, _, extra in declared_flags() if extra["flag"] not in documented] == []


@pytest.mark.parametrize("args, message", [
    (["--block-size", "24"], "--block-size 24: block_size must be a power of two, got 24"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization 1.5: gpu_memory_utilization must be a fraction"),
    (["--batch-size", "9000"], "--max-num-seqs 9000: max_num_batched_tokens (8192) must be at least max_num_seqs (9000)"),
])
def test_a_rejected_knob_value_is_the_models_message_naming_the_flag(args, message, tmp_path, monkeypatch):
    monkeypatch.setenv("VIBEE_CACHE_DIR", str(tmp_path))
    result = CliRunner().invoke(main, ["serve", "--device", "cpu", *args])
    assert result.exit_code == 2, result.output
    assert f"error: {message}" in result.output
    assert "Traceback" not in result.output
