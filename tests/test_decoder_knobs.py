"""The decoder spec drives its module: each knob (rms_norm_warps, rope_warps, silu_mul_block,
one_token_gemv, gemv_tiles) reaches the launches the generated module makes, the generated suite passes on the
edited spec, and it fails when the module was generated without the edit (a generator that ignored
the knob). Bad tables are located spec errors."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from vibee.frontend.errors import SpecError

# Every knob of the shipped spec set to something else, as spec text.
EDITS = {
    "rms_norm_warps": "rms_norm_warps:\n    - {max_width: 128, num_warps: 2}\n    - {num_warps: 16}",
    "rope_warps": "rope_warps:\n    - {min_pairs: 64, num_warps: 8}\n    - {num_warps: 2}",
    "silu_mul_block": "silu_mul_block: 64",
    "one_token_gemv": "one_token_gemv: false",
    "gemv_tiles": "gemv_tiles:\n    - {max_n: 100, block_n: 2, block_k: 64, num_warps: 1, num_stages: 1}\n    - {block_n: 16, block_k: 128, num_warps: 2, num_stages: 2}",
}
# The generated test that sees each knob.
WATCHED_BY = {
    "rms_norm_warps": "test_each_norm_launch_takes_the_specs_warps",
    "rope_warps": "test_each_rope_launch_takes_the_specs_warps",
    "silu_mul_block": "test_silu_mul_launches_take_the_specs_block",
    "one_token_gemv": "test_one_token_steps_take_the_gemv_as_the_spec_says",
    "gemv_tiles": "test_each_gemv_launch_takes_the_specs_tile",
}



def edited(text: str, knob: str) -> str:
    """The spec with the knob's whole entry (a scalar line, or a key and its `- ` rows) replaced."""
    changed, count = re.subn(rf"^  {knob}:.*\n(    - .*\n)*", "  " + EDITS[knob] + "\n", text, count=1, flags=re.M)
    assert count == 1, knob
    return changed


class Spy:
    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, kwargs))


def test_every_knob_has_an_edit_and_a_watching_test():
    from vibee.kinds.decoder.config import DecoderConfig

    assert set(EDITS) == set(WATCHED_BY) == set(DecoderConfig.model_fields)


def test_edited_knobs_reach_the_launches_and_the_suite_passes(spec_text, gen_from_text, monkeypatch):
    text = spec_text("decoder")
    for knob in EDITS:
        text = edited(text, knob)
    gen = gen_from_text(text, name="igla_decoder")
    impl = gen.impl
    spies = {name: Spy() for name in ("_rms_norm_kernel", "_rope_qk_kernel", "_silu_mul_kernel", "_gemv_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(impl, name, spy)
    monkeypatch.setattr(impl, "_use_triton", lambda x: True)
    meta = dict(device="meta", dtype=torch.float16)
    for width in (128, 129):
        impl.rms_norm(torch.empty(2, width, **meta), torch.empty(width, **meta), 1e-5)
    impl.silu_mul(torch.empty(2, 200, **meta), torch.empty(2, 200, **meta))
    for heads in (4, 2):  # 64 and 32 rotation pairs of q a token (head_dim 32)
        impl.apply_rope_qk(torch.empty(3, heads, 32, **meta), torch.empty(3, 1, 32, **meta),
                           torch.empty(3, dtype=torch.int64, device="meta"), torch.empty(16, device="meta"), 1.0)
    impl.linear(torch.empty(1, 256, **meta), torch.empty(64, 256, **meta))  # one token: F.linear, no GEMV launch
    impl.triton_gemv(torch.empty(1, 256, **meta), torch.empty(64, 256, **meta))
    impl.triton_gemv(torch.empty(1, 256, **meta), torch.empty(101, 256, **meta))
    assert [kw["num_warps"] for _, kw in spies["_rms_norm_kernel"].launches] == [2, 16]
    assert [(grid, kw["BLOCK"]) for grid, kw in spies["_silu_mul_kernel"].launches] == [((2, 4), 64)]
    assert [(grid, kw["num_warps"]) for grid, kw in spies["_rope_qk_kernel"].launches] == [((3,), 8), ((3,), 2)]
    assert [(grid, kw["BLOCK_N"], kw["BLOCK_K"], kw["num_warps"], kw["num_stages"]) for grid, kw in spies["_gemv_kernel"].launches] == \
        [((32,), 2, 64, 1, 1), ((7,), 16, 128, 2, 2)]
    # All but the fused GEMV epilogues' kernel tests, which launch tiles of their own (no table, no knob): they
    # run as in the shipped suite, and pass against a module generated without the edits.
    assert gen.run_tests("-k", "not test_the_qkv_gemv_stores_its_row and not test_the_gate_up_gemv_multiplies") == 0


@pytest.mark.parametrize("knob", list(EDITS))
def test_the_generated_suite_fails_when_the_module_ignores_the_knob(spec_text, gen_from_text, knob):
    """The edited spec's tests run against the module the shipped spec generates, as if the
    generator had not read the knob: the test that watches it fails."""
    shipped = gen_from_text(spec_text("decoder"), name="igla_decoder")
    changed = gen_from_text(edited(spec_text("decoder"), knob), name="igla_decoder")
    module = "vibee_gen/igla_decoder.py"
    shutil.copy(shipped.out / module, changed.out / module)
    assert changed.run_tests("-k", WATCHED_BY[knob]) != 0


@pytest.mark.parametrize("setting, message", [
    ("gemv_tiles:\n    - {max_n: 4096, block_n: 4}", "the last row of gemv_tiles must cover every product"),
    ("gemv_tiles:\n    - {block_n: 4}\n    - {block_n: 8}", "gemv_tiles[1] is never used: gemv_tiles[0] takes every product"),
    ("gemv_tiles:\n    - {max_n: 64, min_k: 64, block_n: 4}\n    - {max_n: 32, min_k: 128, block_n: 4}\n    - {block_n: 8}",
     "gemv_tiles[1] is never used"),
    ("gemv_tiles:\n    - {block_n: 3}", "block_n must be a power of two"),
    ("gemv_tiles:\n    - {block_n: 128, block_k: 4096}", "partial sums a program"),
    ("rms_norm_warps:\n    - {num_warps: 4}\n    - {max_width: 64, num_warps: 1}", "rms_norm_warps[1:] are never used"),
    ("rms_norm_warps:\n    - {max_width: 64, num_warps: 1}", "the last row of rms_norm_warps must cover every width"),
    ("silu_mul_block: 1000", "silu_mul_block must be a power of two"),
    ("rope_warps:\n    - {min_pairs: 64, num_warps: 4}\n    - {min_pairs: 128, num_warps: 2}\n    - {num_warps: 1}",
     "rope_warps[1] is never used"),
    ("rope_warps:\n    - {min_pairs: 64, num_warps: 4}", "the last row of rope_warps must cover every step"),
    ("one_token_gemv: 1", "one_token_gemv"),
])
def test_bad_tables_are_located_spec_errors(spec_text, gen_from_text, setting, message):
    knob = setting.split(":")[0]
    text = re.sub(rf"^  {knob}:.*\n(    - .*\n)*", "  " + setting + "\n", spec_text("decoder"), count=1, flags=re.M)
    with pytest.raises(SpecError) as err:
        gen_from_text(text, name="igla_decoder")
    shown = str(err.value)
    assert message in shown and "igla_decoder.vibee:" in shown, shown


def test_explain_shows_each_launch_of_a_one_token_step():
    from vibee.kinds.decoder.config import DecoderConfig
    from vibee.runtime.shapes import shape_config

    shape = shape_config("llama-3.2-1b")
    figures = DecoderConfig().derived(shape)
    assert figures["rms_norm"] == "4 warps a row of 2048"
    assert figures["rope"].startswith("in the qkv_proj GEMV's epilogue (1 rotation pair a program)")  # 2 rows
    assert figures["rope"].endswith("otherwise: 4 warps a token (1024 rotation pairs of q)")
    assert figures["gemv down_proj (2048 x 8192)"] == "1 row x 512 inputs, 4 warps, 1 stage"  # the max_n 2048, min_k 8192 row
    assert figures["gemv lm_head (128256 x 2048)"] == "2 rows x 1024 inputs, 4 warps, 1 stage"  # the last row
    off = DecoderConfig(one_token_gemv=False).derived(shape)
    assert off["gemv o_proj (2048 x 2048)"].startswith("F.linear") and off["rope"].startswith("4 warps a token")


@pytest.mark.parametrize("setting, row", [
    ("gemv_tiles:\n    - {max_n: 64, block_n: 4}\n    - {max_n: 9000, block_n: 8}", "{max_n: 9000, block_n: 8}"),
    ("rope_warps:\n    - {min_pairs: 64, num_warps: 4}\n    - {min_pairs: 128, num_warps: 2}\n    - {num_warps: 1}",
     "{min_pairs: 128, num_warps: 2}"),
])
def test_a_table_error_points_at_the_row_it_names(spec_text, gen_from_text, setting, row):
    knob = setting.split(":")[0]
    text = re.sub(rf"^  {knob}:.*\n(    - .*\n)*", "  " + setting + "\n", spec_text("decoder"), count=1, flags=re.M)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.strip() == f"- {row}")
    with pytest.raises(SpecError) as err:
        gen_from_text(text, name="igla_decoder")
    assert f"igla_decoder.vibee:{line}:7:" in str(err.value), str(err.value)
