"""`vibee profile`: the step's kernels attributed to the model's scopes, the work each scope counts,
the command's report and plot, and a GPU run where the kernels are CUDA kernels."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from tests.spec_edit import specs_with_knob
from vibee.bench.profile_scopes import attention_work, counted_scopes, fold_layer
from vibee.bench.profile_step import OTHER, profile_step, scope_rows
from vibee.cli import main
from vibee.runtime.config import DEFAULT_MODEL_DIR

needs_model = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").exists(), reason="no default model")


def _tiny(quant: str = "none", device: str = "cpu"):
    from vibee.bench.latency import build_rank_model

    params = {"shape": None, "model": None, "device": device, "dtype": "float32" if device == "cpu" else "auto",
              "quant": quant, "flash_attn": True, "enforce_eager": True}
    return build_rank_model(params)


def test_fold_layer_names_a_kind_of_work_across_layers():
    assert fold_layer("model.layers.12.mlp.down_proj") == "layers.*.mlp.down_proj"
    assert fold_layer("model.norm") == "norm" and fold_layer("lm_head") == "lm_head"


def test_attention_work_counts_the_causal_pairs_one_by_one():
    q_lens, seq_lens, h, kv, d = [1, 3, 5], [7, 3, 9], 4, 2, 8
    pairs = 0
    for n, s in zip(q_lens, seq_lens):
        for i in range(n):  # new token i sits at position s - n + i and sees every key up to itself
            pairs += s - n + i + 1
    nbytes, flops = attention_work(q_lens, seq_lens, h, kv, d, q_bytes=2, kv_bytes=1)
    assert flops == 4 * pairs * h * d
    assert nbytes == (sum(q_lens) + sum(seq_lens)) * 2 * kv * d * 1 + 2 * sum(q_lens) * h * d * 2


@needs_model
def test_scopes_count_each_layers_work_and_own_every_kernel():
    run = _tiny()
    model, gen, cfg = run["model"], run["gen"], run["model_config"]
    batch, context = 2, 16
    p = profile_step(model, gen.kv_cache, batch_size=batch, context_len=context, device="cpu",
                       block_size=gen.configs.kv_cache.block_size, steps=2, warmup_steps=1)
    layers, hidden, inner = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    expected_flops = {"layers.*.self_attn.qkv_proj": 2 * batch * hidden * (q_out + 2 * kv_out) * layers,
                      "layers.*.self_attn.o_proj": 2 * batch * q_out * hidden * layers,
                      "layers.*.mlp.gate_up_proj (+ silu*mul)": 2 * batch * hidden * 2 * inner * layers,
                      "lm_head": 2 * batch * hidden * cfg.vocab_size}
    for scope, flops in expected_flops.items():
        assert p.work[scope].flops == flops, scope
    # A float32 linear reads its weight once at least: bytes cover the stacked q, k, v rows.
    assert p.work["layers.*.self_attn.qkv_proj"].bytes > 4 * hidden * (q_out + 2 * kv_out) * layers
    # Every sequence's KV at the profiled steps' mean length is read, per layer.
    attn = p.work["layers.*.self_attn.attention"]
    kv_read = batch * (context + 0.5) * 2 * kv_out * 4 * layers
    assert attn.calls == layers and attn.bytes > kv_read
    assert {"embed_tokens", "layers.*.input_layernorm", "layers.*.post_attention_layernorm", "layers.*.self_attn.rope",
            "norm", "argmax"} <= set(p.work)
    # linear_silu_mul's own linear and silu_mul are its work, not scopes of their own counted twice.
    gate_up = p.work["layers.*.mlp.gate_up_proj (+ silu*mul)"]
    assert "layers.*.mlp.silu_mul" not in p.work and "layers.*.mlp.gate_up_proj" not in p.work
    assert gate_up.bytes == (batch * hidden + 2 * inner * hidden + batch * inner) * 4 * layers
    assert p.work["layers.*.mlp.down_proj"].bytes == (batch * inner + inner * hidden + batch * hidden) * 4 * layers
    # The time is all accounted for: every op's own time lands in exactly one scope.
    assert sum(k.seconds for k in p.kernels) == pytest.approx(p.kernel_seconds)
    by_scope = {}
    for k in p.kernels:
        by_scope.setdefault(k.scope, set()).add(k.kernel)
    assert any("mm" in name or "linear" in name for name in by_scope["lm_head"])
    rows = {r.scope: r for r in scope_rows(p, bandwidth_bytes_s=1e10, flops_s=1e11)}
    qkv = rows["layers.*.self_attn.qkv_proj"]
    assert qkv.limit_seconds == pytest.approx(max(qkv.bytes / 1e10, qkv.flops / 1e11))
    assert rows[OTHER].bytes == 0 if OTHER in rows else True


class _Range:
    def __init__(self, start, end):
        self.start, self.end = start, end

    def elapsed_us(self):
        return self.end - self.start


class _Event:
    def __init__(self, name, device, start, end, id=0, is_user_annotation=False):
        self.name, self.device_type, self.id, self.time_range = name, device, id, _Range(start, end)
        self.is_user_annotation = is_user_annotation


def test_cuda_kernels_go_to_the_scope_open_at_their_launch():
    from vibee.bench.profile_step import attribute

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    events = [_Event("vibee::layers.*.mlp", cpu, 0, 100), _Event("vibee::layers.*.mlp.down_proj", cpu, 50, 90),
              _Event("aten::mm", cpu, 55, 60, id=7),  # an op's id is no CUPTI id: never a launch
              _Event("cuLaunchKernelEx", cpu, 10, 12, id=7), _Event("cudaLaunchKernel", cpu, 60, 61, id=8),
              _Event("cuLaunchKernel", cpu, 95, 96, id=9), _Event("cuLaunchKernel", cpu, 120, 121, id=10),
              _Event("silu_mul_kernel", cuda, 200, 203, id=7), _Event("gemm", cuda, 203, 213, id=8),
              _Event("tail", cuda, 213, 214, id=9), _Event("argmax", cuda, 214, 216, id=10),
              _Event("Memcpy HtoD", cuda, 216, 220, id=99),
              # The scopes' own ranges on the GPU's timeline (profiler annotations, no kernels).
              _Event("vibee::layers.*.mlp", cuda, 200, 214, id=3, is_user_annotation=True),
              _Event("vibee::layers.*.mlp.down_proj", cuda, 203, 214, id=4, is_user_annotation=True)]

    class Prof:
        def events(self):
            return events

    kernels, total = attribute(Prof(), "cuda")
    got = {(k.scope, k.kernel): (k.launches, k.seconds) for k in kernels}
    assert got == {("layers.*.mlp", "silu_mul_kernel"): (1, 3e-6), ("layers.*.mlp.down_proj", "gemm"): (1, 10e-6),
                   ("layers.*.mlp", "tail"): (1, 1e-6), (OTHER, "argmax"): (1, 2e-6), (OTHER, "Memcpy HtoD"): (1, 4e-6)}
    assert total == pytest.approx(20e-6)


@needs_model
def test_a_prefill_step_counts_its_prompts_tokens_and_causal_pairs():
    run = _tiny()
    model, gen, cfg = run["model"], run["gen"], run["model_config"]
    batch, prompt = 2, 8
    p = profile_step(model, gen.kv_cache, batch_size=batch, context_len=prompt, device="cpu", phase="prefill",
                     block_size=gen.configs.kv_cache.block_size, steps=1, warmup_steps=1)
    hidden, q_out, kv_out = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    tokens = batch * prompt
    assert p.work["layers.*.self_attn.qkv_proj"].flops == 2 * tokens * hidden * (q_out + 2 * kv_out) * cfg.num_layers
    pairs = batch * prompt * (prompt + 1) // 2  # each new token sees itself and the ones before it
    assert p.work["layers.*.self_attn.attention"].flops == 4 * pairs * q_out * cfg.num_layers
    # Only the last position of each prompt is sampled: lm_head's rows are the batch's.
    assert p.work["lm_head"].flops == 2 * batch * hidden * cfg.vocab_size


@needs_model
def test_counted_scopes_put_everything_back():
    run = _tiny()
    model = run["model"]
    names = ("linear", "linear_silu_mul", "rms_norm", "apply_rope_qk", "silu_mul", "rope_linear")
    originals = {name: getattr(model.ops, name) for name in names}
    backend = model.attention
    from vibee.bench.profile_scopes import Tally

    with counted_scopes(model, Tally()):
        assert all(getattr(model.ops, name) is not originals[name] for name in names)
        assert model.attention is not backend and any(m._forward_pre_hooks for m in model.modules())
    assert {name: getattr(model.ops, name) for name in names} == originals
    assert model.attention is backend
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def _stored_bytes(layer) -> int:
    """What a layer's weights take in memory: what its one-row forward reads."""
    return sum(t.numel() * t.element_size() for t in (*layer.parameters(), *layer.buffers()))


def _one_token_step(model, gen):
    """The profile of one batch-1 decode step at context 8 on the CPU."""
    return profile_step(model, gen.kv_cache, batch_size=1, context_len=8, device="cpu",
                        block_size=gen.configs.kv_cache.block_size, steps=1, warmup_steps=1)


@needs_model
def test_quantized_layers_are_scopes_with_their_stored_bytes():
    run = _tiny("int8")
    model, gen = run["model"], run["gen"]
    p = _one_token_step(model, gen)
    layer = model.model.layers[0].mlp.gate_up_proj
    assert type(layer) is not nn.Linear  # quantized
    stored = _stored_bytes(layer)
    x_and_y = (layer.in_features + layer.out_features) * 4
    assert p.work["layers.*.mlp.gate_up_proj"].bytes == stored * len(model.model.layers) + x_and_y * len(model.model.layers)


@needs_model
def test_a_down_projection_that_takes_silu_times_up_itself_is_its_own_scope(monkeypatch):
    # On a GPU a quantized down projection's one row takes gate_up whole (silu_mul_forward), so the
    # model never calls the layer: the profile scopes and counts that call as the layer's.
    run = _tiny("int8")
    model, gen = run["model"], run["gen"]
    down = model.model.layers[0].mlp.down_proj
    taken = []

    def silu_mul_forward(self, gate_up):
        taken.append(gate_up.shape[-1])
        return gate_up.new_zeros(*gate_up.shape[:-1], self.out_features)

    monkeypatch.setattr(type(down), "silu_mul_forward", silu_mul_forward)
    p = _one_token_step(model, gen)
    layers = len(model.model.layers)
    stored = _stored_bytes(down)
    gate_up_and_y = (2 * down.in_features + down.out_features) * 4
    assert taken and p.work["layers.*.mlp.down_proj (+ silu*mul)"].bytes == (stored + gate_up_and_y) * layers
    assert "layers.*.mlp.down_proj" not in p.work
    assert "silu_mul_forward" not in vars(down)  # put back


@needs_model
def test_a_qkv_projection_that_rotates_and_stores_kv_itself_is_its_own_scope(monkeypatch):
    # On a GPU a quantized qkv projection's one row also runs RoPE and the KV write (rope_forward),
    # so the model calls neither the layer nor RoPE's kernel: the profile scopes and counts that call.
    run = _tiny("int8")
    model, gen = run["model"], run["gen"]
    qkv = model.model.layers[0].self_attn.qkv_proj
    taken = []

    def rope_forward(self, x, **rope):
        taken.append(sorted(rope))
        return x.new_zeros(*x.shape[:-1], self.out_features)

    monkeypatch.setattr(type(qkv), "rope_forward", rope_forward, raising=False)
    def pages_to_write(layer, batch, kv_cache, x):  # as on a GPU, for the one-token steps
        return (kv_cache.k_pages[layer].data, kv_cache.v_pages[layer].data, batch.slot_mapping) if len(x) == 1 else None

    monkeypatch.setattr(type(model.attention), "pages_to_write", staticmethod(pages_to_write))
    monkeypatch.setattr(model.ops, "runs_kernels", lambda x: len(x) == 1)
    p = _one_token_step(model, gen)
    layers = len(model.model.layers)
    stored = _stored_bytes(qkv)
    x_and_y = (qkv.in_features + qkv.out_features) * 4
    kv_rows = 2 * model.config.num_kv_heads * model.config.head_dim * 4
    assert taken and "k_pages" in taken[0]
    assert p.work["layers.*.self_attn.qkv_proj (+ rope, KV write)"].bytes == (stored + x_and_y + kv_rows) * layers
    assert "layers.*.self_attn.qkv_proj" not in p.work and not any("rope" in s and "qkv" not in s for s in p.work)
    assert "rope_forward" not in vars(qkv)  # put back


@needs_model
def test_an_unquantized_qkv_gemv_that_rotates_and_stores_kv_is_the_projections_scope(monkeypatch):
    # On a GPU a 16-bit qkv projection's one row goes through the decoder spec's GEMV with RoPE's
    # epilogue (ops.rope_linear): its scope is the projection's, counting the weight, x, the row and
    # the K/V rows; one that declines (None) is counted where the model projects instead.
    run = _tiny()
    model, gen = run["model"], run["gen"]
    qkv = model.model.layers[0].self_attn.qkv_proj
    taken = []

    def rope_linear(x, weight, bias=None, **rope):
        taken.append(sorted(rope))
        return x.new_zeros(*x.shape[:-1], weight.shape[0]) if len(taken) % 2 else None

    monkeypatch.setattr(model.ops, "rope_linear", rope_linear)
    rope = model.ops.apply_rope_qk  # where rope_linear declines: RoPE on the CPU, the pages left alone
    monkeypatch.setattr(model.ops, "apply_rope_qk", lambda q, k, *args, kv_write=None: rope(q, k, *args))

    def pages_to_write(layer, batch, kv_cache, x):
        return (kv_cache.k_pages[layer].data, kv_cache.v_pages[layer].data, batch.slot_mapping) if len(x) == 1 else None

    monkeypatch.setattr(type(model.attention), "pages_to_write", staticmethod(pages_to_write))
    monkeypatch.setattr(model.ops, "runs_kernels", lambda x: len(x) == 1)
    p = _one_token_step(model, gen)
    cfg = model.config
    row_bytes = (qkv.in_features + qkv.out_features) * 4
    kv_rows = 2 * cfg.num_kv_heads * cfg.head_dim * 4
    fused, plain = p.work["layers.*.self_attn.qkv_proj (+ rope, KV write)"], p.work["layers.*.self_attn.qkv_proj"]
    assert taken and "k_pages" in taken[0] and fused.calls and plain.calls  # every other call declined
    assert fused.bytes == (_stored_bytes(qkv) + row_bytes + kv_rows) * fused.calls
    assert plain.bytes == (_stored_bytes(qkv) + row_bytes) * plain.calls


@needs_model
def test_profile_command_reports_plots_and_compares(tmp_path):
    result = CliRunner().invoke(main, ["profile", "--device", "cpu", "--dtype", "float32", "--batch-size", "2",
                                       "--context-len", "12", "--steps", "1", "--compare-quant", "int8",
                                       "--result-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (path,) = tmp_path.glob("profile-*.json")
    data = json.loads(path.read_text())
    a, b = data["variants"]["A"], data["variants"]["B"]
    assert a["settings"].endswith("quant none") and b["settings"].endswith("quant int8")
    scopes_a = {s["scope"]: s for s in a["scopes"]}
    scopes_b = {s["scope"]: s for s in b["scopes"]}
    # The compared precision took effect: int8 weights are a quarter of float32's bytes.
    assert scopes_b["layers.*.self_attn.o_proj"]["bytes"] < 0.5 * scopes_a["layers.*.self_attn.o_proj"]["bytes"]
    assert a["summary"]["kernel_seconds"] > 0 and 0 < a["summary"]["fraction_of_limit"]
    assert data["ceilings"]["copy_tb_s"] > 0
    md = path.with_suffix(".md").read_text()
    assert "B against A" in md and "layers.*.self_attn.attention" in md
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


@needs_model
def test_profile_compares_a_spec_variant(tmp_path):
    variant = specs_with_knob(tmp_path / "specs", "igla_kv_cache.vibee", "block_size", "8")
    result = CliRunner().invoke(main, ["profile", "--device", "cpu", "--dtype", "float32", "--context-len", "12",
                                       "--steps", "1", "--phase", "prefill", "--compare", str(variant),
                                       "--result-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    data = json.loads(next((tmp_path / "out").glob("profile-*.json")).read_text())
    a, b = data["variants"]["A"], data["variants"]["B"]
    assert (a["kv_block_size"], b["kv_block_size"]) == (16, 8) and str(variant) in b["settings"]
    assert data["phase"] == "prefill" and a["summary"]["graph_step_seconds"] is None


def test_profile_command_refuses_a_context_with_no_prompt(tmp_path):
    result = CliRunner().invoke(main, ["profile", "--device", "cpu", "--context-len", "3", "--result-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--context-len" in result.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernels_land_in_their_scopes():
    run = _tiny(device="cuda")
    model, gen = run["model"], run["gen"]
    p = profile_step(model, gen.kv_cache, batch_size=4, context_len=64, device="cuda",
                       block_size=gen.configs.kv_cache.block_size, steps=2, warmup_steps=2)
    scopes = {k.scope for k in p.kernels}
    for scope in ("layers.*.self_attn.qkv_proj", "layers.*.self_attn.attention", "layers.*.self_attn.rope",
                  "layers.*.input_layernorm", "lm_head"):
        assert scope in scopes, (scope, sorted(scopes))
    unlinked = sum(k.seconds for k in p.kernels if k.scope == OTHER)
    assert unlinked < 0.2 * p.kernel_seconds, [k for k in p.kernels if k.scope == OTHER]
