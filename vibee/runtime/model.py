"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2) over flattened, unpadded token batches.

Module names follow Hugging Face's (model.embed_tokens, model.layers.N.self_attn.o_proj, ...,
lm_head), except that q_proj/k_proj/v_proj are one merged `self_attn.qkv_proj` and gate_proj/up_proj
one `mlp.gate_up_proj` (fewer, larger GEMVs per layer; see MERGED). Checkpoint tensors still load by
their Hugging Face names, each into its row range of the merged weight, and the generated
`quantize_model` finds plain `nn.Linear` layers to swap (its scales are per output row, so quantizing
a merged weight equals quantizing the parts). The numerics follow transformers': RMSNorm in float32, RoPE with the
rotate-half layout and cos/sin computed in float32, SwiGLU MLP, attention scale 1/sqrt(head_dim).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch
from torch import nn

from vibee.runtime.attention import AttentionBackend, AttentionBatch
from vibee.kinds.decoder.interface import DecoderModule
from vibee.kinds.flash_attention.interface import AttentionFunctions
from vibee.runtime.model_config import LoadError, ModelConfig
from vibee.runtime.rope import RopeInputs, Rotary

if TYPE_CHECKING:
    from vibee.runtime.generated import GeneratedModules


# ---- layers ---------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: Any, ops: DecoderModule):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device))
        self.eps, self.ops = eps, ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised h, h) with h = x + residual (x when residual is None): the residual add
        fused into the norm (one kernel on CUDA)."""
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


def _linear(n_in: int, n_out: int, bias: bool, dtype: torch.dtype) -> nn.Linear:
    # On the meta device: no random init, storage comes with to_empty() and then the checkpoint.
    return nn.Linear(n_in, n_out, bias=bias, device="meta", dtype=dtype)


def _project(ops: DecoderModule, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x); an unquantized layer goes through the decoder spec's linear (a one-token step on
    CUDA takes its GEMV). A plain nn.Linear, not a subclass: the quantizer swaps exact nn.Linear layers."""
    if type(layer) is nn.Linear:
        return ops.linear(x, layer.weight, layer.bias)
    return layer(x)


# Merged projections: module -> the Hugging Face projections stacked (in this order) along its
# output rows. Their checkpoint tensors are copied into the row ranges by load_weights.
MERGED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype: torch.dtype, ops: DecoderModule):
        super().__init__()
        h, kv, d = config.num_heads, config.num_kv_heads, config.head_dim
        self.layer, self.num_heads, self.num_kv_heads, self.head_dim = layer, h, kv, d
        self.ops = ops
        self.split_sizes = (h * d, kv * d, kv * d)
        # q_proj, k_proj and v_proj of the checkpoint, stacked: one GEMV instead of three.
        self.qkv_proj = _linear(config.hidden_size, (h + 2 * kv) * d, config.attention_bias, dtype)
        self.o_proj = _linear(h * d, config.hidden_size, config.o_proj_bias, dtype)
        # The model's own sliding window for this layer (config.json), a runtime argument of the
        # generated attention: Mistral and Qwen2 run the same kernels as Llama.
        self.window = config.layer_window(layer)

    def forward(self, x, rope: "RopeInputs", backend: AttentionBackend, batch: AttentionBatch, kv_cache) -> torch.Tensor:
        t = x.shape[0]
        # On a GPU the new K/V go to the cache's pages from RoPE's kernel, or for one token from the
        # projection's GEMV itself (rotated there too): a kernel or two fewer a layer.
        pages = backend.pages_to_write(self.layer, batch, kv_cache, x) if self.ops.runs_kernels(x) else None
        qkv = self._rotated_by_projection(x, rope, pages) if pages is not None and t == 1 else None
        # Column slices of the [T, q + 2 kv] output (row stride q + 2 kv): RoPE writes new
        # contiguous q and k, the KV cache write and attention read v through its strides.
        q, k, v = (qkv if qkv is not None else _project(self.ops, self.qkv_proj, x)).split(self.split_sizes, dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if qkv is None:
            kv_write = None if pages is None else self.ops.KVWrite(v, *pages)
            q, k = self.ops.apply_rope_qk(q, k, rope.positions, rope.inv_freq, rope.attention_scaling, rope.cos_sin,
                                          kv_write=kv_write)
        out = backend(self.layer, q, k, v, batch, kv_cache, window=self.window, kv_written=pages is not None)
        return _project(self.ops, self.o_proj, out.reshape(t, self.num_heads * self.head_dim))

    def _rotated_by_projection(self, x: torch.Tensor, rope: "RopeInputs", pages: tuple) -> torch.Tensor | None:
        """The QKV row of one token with q and k rotated and k, v stored in `pages` by the projection
        itself (the decoder spec's GEMV for 16-bit weights, a quantized layer's rope_forward); None
        where the layer has no such launch."""
        if type(self.qkv_proj) is nn.Linear:
            rope_forward = functools.partial(self.ops.rope_linear, weight=self.qkv_proj.weight, bias=self.qkv_proj.bias)
        else:
            rope_forward = getattr(self.qkv_proj, "rope_forward", None)
        if rope_forward is None:
            return None
        k_pages, v_pages, slots = pages
        return rope_forward(x, positions=rope.positions, inv_freq=rope.inv_freq, scaling=rope.attention_scaling,
                            q_heads=self.num_heads, kv_heads=self.num_kv_heads, head_dim=self.head_dim, slots=slots,
                            k_pages=k_pages, v_pages=v_pages)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, ops: DecoderModule):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.ops = ops
        # gate_proj and up_proj of the checkpoint, stacked: one GEMV instead of two.
        self.gate_up_proj = _linear(hidden, 2 * inner, bias, dtype)
        self.down_proj = _linear(inner, hidden, bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Quantized down projections that take [gate | up] whole and multiply silu * up themselves:
        # the int GEMV's one row, fp8's rounding of its rows.
        silu_mul_forward = getattr(self.down_proj, "silu_mul_forward", None)
        if type(self.gate_up_proj) is nn.Linear and silu_mul_forward is None:
            # A one-token step's gate_up GEMV multiplies silu(gate) * up in its epilogue.
            act = self.ops.linear_silu_mul(x, self.gate_up_proj.weight, self.gate_up_proj.bias)
            return _project(self.ops, self.down_proj, act)
        gate_up = _project(self.ops, self.gate_up_proj, x)
        y = silu_mul_forward(gate_up) if silu_mul_forward is not None else None
        if y is not None:
            return y
        # The halves are column slices of gate_up; the Triton silu_mul reads them in place.
        gate, up = gate_up.chunk(2, dim=-1)
        return _project(self.ops, self.down_proj, self.ops.silu_mul(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype: torch.dtype, ops: DecoderModule):
        super().__init__()
        self.self_attn = Attention(config, layer, dtype, ops)
        self.mlp = MLP(config, dtype, ops)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, "meta", ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, "meta", ops)

    def forward(self, x, residual, rope, backend, batch, kv_cache) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output (the embeddings for layer 0, residual None), residual:
        the stream before it. Returns (this layer's MLP output, the stream before it); the add of
        each sublayer's output to the stream happens in the next norm."""
        normed, residual = self.input_layernorm(x, residual)
        attn = self.self_attn(normed, rope, backend, batch, kv_cache)
        normed, residual = self.post_attention_layernorm(attn, residual)
        return self.mlp(normed), residual


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, ops: DecoderModule):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, device="meta", dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, i, dtype, ops) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, "meta", ops)


# ---- the model ------------------------------------------------------------------------------


def expected_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint must hold for this config, by Hugging Face name."""
    hidden, inner, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    q_out, kv_out = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        linears = {"self_attn.q_proj": (q_out, hidden, config.attention_bias),
                   "self_attn.k_proj": (kv_out, hidden, config.attention_bias),
                   "self_attn.v_proj": (kv_out, hidden, config.attention_bias),
                   "self_attn.o_proj": (hidden, q_out, config.o_proj_bias),
                   "mlp.gate_proj": (inner, hidden, config.mlp_bias),
                   "mlp.up_proj": (inner, hidden, config.mlp_bias),
                   "mlp.down_proj": (hidden, inner, config.mlp_bias)}
        for name, (n_out, n_in, bias) in linears.items():
            shapes[p + name + ".weight"] = (n_out, n_in)
            if bias:
                shapes[p + name + ".bias"] = (n_out,)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    return shapes


class LlamaForCausalLM(nn.Module):
    """forward(input_ids [T], positions [T], batch, kv_cache) -> hidden [T, hidden] after the final
    norm; compute_logits(hidden rows) -> float32 logits. Parameters are uninitialised until
    load_weights (the model is only ever run with a checkpoint's weights)."""

    def __init__(self, config: ModelConfig, attention: AttentionBackend, ops: DecoderModule, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", replace_linear: Callable[[str, nn.Linear], nn.Module | None] | None = None):
        """ops: the generated decoder module (add + RMSNorm, SiLU * up, the linear layers' GEMV).
        replace_linear(name, layer): a module to take the (meta) linear layer's place, or None
        to keep it; called before any storage exists (a pre-quantized checkpoint's layers)."""
        super().__init__()
        self.config = config
        self.attention = attention
        self.ops = ops
        self.dtype = dtype
        self.model = DecoderModel(config, dtype, ops)
        self.lm_head = _linear(config.hidden_size, config.vocab_size, False, dtype)
        for name, module in list(self.named_modules()) if replace_linear is not None else ():
            replacement = replace_linear(name, module) if type(module) is nn.Linear else None
            if replacement is not None:
                parent, _, attr = name.rpartition(".")
                setattr(self.get_submodule(parent), attr, replacement)
        self.to_empty(device=device)
        self.requires_grad_(False)  # inference only: no autograd bookkeeping even outside no_grad
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # after to_empty, which would split them
        self.rotary = Rotary(config, device)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def load_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                     source: str = "weights", other: Callable[[str, torch.Tensor], bool] | None = None) -> None:
        """Copy checkpoint tensors in by Hugging Face name. Unknown names are skipped (e.g. old
        rotary_emb.inv_freq buffers, or lm_head.weight of a tied model); a missing tensor or a
        wrong shape is a LoadError naming it. The merged qkv_proj / gate_up_proj take their parts'
        tensors (q_proj, k_proj, v_proj / gate_proj, up_proj) into their row ranges. Call before
        quantize_model. other(name, tensor): offered every tensor no parameter takes (a pre-quantized
        layer's codes); True when it took it."""
        targets = self.checkpoint_targets()
        where = getattr(weights, "source", source)
        items = weights.items() if isinstance(weights, Mapping) else weights
        loaded: set[str] = set()
        with torch.no_grad():
            for name, tensor in items:
                target = targets.get(name)
                if target is None:
                    if other is not None:
                        other(name, tensor)
                    continue
                if tuple(tensor.shape) != tuple(target.shape):
                    raise LoadError(f"{where}: tensor {name} has shape {list(tensor.shape)}, the config needs {list(target.shape)}")
                target.copy_(tensor)
                loaded.add(name)
        missing = [name for name in targets if name not in loaded]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise LoadError(f"{where}: missing tensor {missing[0]}{more}")

    def checkpoint_targets(self) -> dict[str, torch.Tensor]:
        """Every checkpoint tensor this model takes, by Hugging Face name, in parameter order: the
        parameter itself, or for the parts of a merged projection the view of its rows (the parts
        stacked in MERGED order). A tied lm_head.weight appears once, as the embedding."""
        targets: dict[str, torch.Tensor] = {}
        for name, param in self.named_parameters():
            prefix, merged, kind = _split_merged_name(name)
            if merged is None:
                targets[name] = param
                continue
            sizes = self.get_submodule(prefix + "self_attn").split_sizes if merged == "self_attn.qkv_proj" \
                else (self.config.intermediate_size,) * 2
            for part, rows in zip(MERGED[merged], param.split(sizes, dim=0)):
                targets[f"{prefix}{part}.{kind}"] = rows
        return targets

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch, kv_cache: Any) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)
        rotary = self.rotary  # the torch path takes cos/sin computed once a forward; the kernel computes its own
        cos_sin = None if self.ops.runs_kernels(h) else self.ops.rope_cos_sin(positions, rotary.inv_freq, rotary.attention_scaling, h.dtype)
        rope = RopeInputs(positions, rotary.inv_freq, rotary.attention_scaling, cos_sin)
        residual = None
        for layer in self.model.layers:
            h, residual = layer(h, residual, rope, self.attention, batch, kv_cache)
        return self.model.norm(h, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return _project(self.ops, self.lm_head, hidden).float()


def _split_merged_name(name: str) -> tuple[str, str | None, str]:
    """(the layer prefix, the merged module or None, weight/bias) of a parameter name."""
    for merged in MERGED:
        for kind in ("weight", "bias"):
            suffix = f"{merged}.{kind}"
            if name.endswith("." + suffix):
                return name[: -len(suffix)], merged, kind
    return name, None, ""


def check_head_dim(config: ModelConfig, fa_module: AttentionFunctions, source: str = "config.json") -> None:
    """LoadError when the generated attention was not compiled for the model's head_dim."""
    head_dims = getattr(fa_module, "HEAD_DIMS", None)  # the reference has none: it takes any head_dim
    if head_dims is not None and config.head_dim not in head_dims:
        raise LoadError(f"{source}: head_dim {config.head_dim} is not supported by the generated attention "
                        f"(it is compiled for head_dims {list(head_dims)}; add it to head_dims in the flash_attention spec)")


def build_model(loaded: Any, gen: GeneratedModules, *, flash_attn: bool = True) -> LlamaForCausalLM:
    """The model of a LoadedModel with its weights, over the generated flash attention (or its
    reference, for --no-flash-attn)."""
    fa: AttentionFunctions = gen.flash_attention if flash_attn else gen.flash_attention_reference
    config: ModelConfig = loaded.config
    check_head_dim(config, fa, str(loaded.model_dir / "config.json"))  # the reference takes any head_dim
    backend = AttentionBackend(fa, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                               fuse_kv_store=gen.configs.kv_cache.fuse_kv_store)
    pre = None
    if loaded.quantization is not None:  # a pre-quantized checkpoint: its layers become QuantLinear before any storage
        from vibee.runtime.prequantized import Prequantized

        pre = Prequantized(loaded.quantization, loaded.quantized_layers, gen.quantization)
    model = LlamaForCausalLM(config, backend, gen.decoder, dtype=loaded.dtype, device=loaded.device,
                             replace_linear=None if pre is None else pre.replace_linear)
    model.load_weights(loaded.weights, other=None if pre is None else pre.take)
    if pre is not None:
        pre.load_into(model, str(loaded.model_dir))
    return model
