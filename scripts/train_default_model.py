"""Train vibee's built-in default models: a small Llama and a much smaller draft model.

Both learn from the Python standard library's own source (every machine has it offline) with one
byte-level BPE tokenizer, and are written in Hugging Face layout:

    python scripts/train_default_model.py --device cuda                 # -> models/vibee-tiny{,-draft}/
    python scripts/train_default_model.py --quick                       # smoke run into a temp dir

The target trains on next-token prediction; the draft then trains on a mix of the data and the
target's distribution (distillation), so its greedy guesses agree with the target's more often,
which is what speculative decoding pays off on. Afterwards both are reloaded from the saved bf16
files and measured on held-out files: perplexity of each, and how often their greedy next tokens
agree. The figures go into the model card (README.md) and training_stats.json.

Needs torch, transformers, tokenizers and safetensors; rich (optional) draws the progress bar.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import shlex
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
TARGET_NAME = "vibee-tiny"
DRAFT_NAME = "vibee-tiny-draft"
MAX_TOTAL_BYTES = 30 * 1000 * 1000  # the "30 MB at most in all"

EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOT, IM_START, IM_END]  # ids 0, 1, 2 in this order
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Where BPE tokens may not cross. GPT-2's split glues a space to the *next* word (" foo"), so a
# prompt ending in a space or in indentation ("def ", "x = ", "):\n    ") ends on a token the model
# never saw at that spot, and it continues with junk. Here a space goes with the word or symbol
# *before* it ("def ", "= "), a line break is a token of its own and indentation is one run, so
# the usual places where a completion prompt stops are token boundaries in training too.
PRE_TOKEN_PATTERN = (
    r"[\p{L}\p{N}_]+ ?"  # an identifier, keyword or number, and one space after it
    r"|[^\s\p{L}\p{N}_]+ ?"  # a run of operators/punctuation, and one space after it
    r"|\r?\n|\r"  # each line break alone
    r"|[^\S\r\n]+"  # indentation and other runs of spaces and tabs
)

# Directory names that hold the stdlib's own test suites. Many Python builds (Debian's, the
# official Docker images) ship without them, so leaving them out everywhere keeps the data the
# same kind of text on every machine.
TEST_DIRS = {"test", "tests", "idle_test"}
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
# Data that happens to live in .py files: pydoc's help topics (prose in one string) and the codec
# tables that gencodec.py generated (encodings/cp864.py ...). They are 15% of the bytes, would teach
# nothing about code, and their near-certain tokens would flatter the perplexity.
DATA_DIRS = {"pydoc_data"}
GENERATED_MARKER = "gencodec.py"

MAX_LEN = 1024  # max_position_embeddings and model_max_length
EVAL_LEN = 512  # window of the reported perplexity
HELD_OUT_PERCENT = 2  # reported perplexity and agreement
VALID_PERCENT = 2  # picks the best checkpoint during training; never reported as a result


def split_of(relpath: str) -> str:
    """'held_out', 'valid' or 'train' for a file, from a hash of its path relative to the stdlib.

    Hashing the path (not the content) keeps a file on the same side across Python versions, so a
    held-out file is held out whichever stdlib the model was trained on.
    """
    bucket = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big") % 100
    if bucket < HELD_OUT_PERCENT:
        return "held_out"
    if bucket < HELD_OUT_PERCENT + VALID_PERCENT:
        return "valid"
    return "train"


@dataclass
class Corpus:
    root: Path
    files: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # split -> [(relpath, text)]
    skipped_undecodable: int = 0

    def texts(self, split: str) -> list[str]:
        return [text for _, text in self.files.get(split, [])]

    def summary(self) -> dict:
        return {
            split: {
                "files": len(docs),
                "bytes": sum(len(text.encode("utf-8")) for _, text in docs),
            }
            for split, docs in sorted(self.files.items())
        }


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: Path) -> list[str]:
    """Relative paths of the stdlib's *.py files (test suites and installed packages left out), sorted."""
    paths = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if any(part in SKIP_DIRS or part in TEST_DIRS or part in DATA_DIRS for part in parts[:-1]):
            continue
        paths.append(path.relative_to(root).as_posix())
    return sorted(paths)


def load_corpus(root: Path, quick: bool) -> Corpus:
    corpus = Corpus(root=root, files={"train": [], "valid": [], "held_out": []})
    budget = {"train": 200_000, "valid": 8_000, "held_out": 8_000} if quick else None
    for rel in stdlib_sources(root):
        split = split_of(rel)
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            corpus.skipped_undecodable += 1  # a few stdlib files are latin-1 on purpose
            continue
        if not text.strip() or GENERATED_MARKER in text[:1000]:
            continue
        if budget is not None:
            if budget[split] <= 0 or len(text) > 20_000:
                continue
            budget[split] -= len(text)
        corpus.files[split].append((rel, text))
    return corpus


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKEN_PATTERN), behavior="isolated"),
        # Bytes to printable symbols only; no prefix space, so decode(encode(text)) == text.
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    eot_id = tokenizer.token_to_id(EOT)
    assert eot_id == 0, eot_id
    # Training documents are each preceded by <|endoftext|>, so a prompt starts the same way: it
    # doubles as the BOS token that encode(..., add_special_tokens=True) puts in front.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B", special_tokens=[(EOT, eot_id)]
    )
    return tokenizer


def tokenizer_config(max_len: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": EOT,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def encode_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Documents packed into one stream, each preceded by <|endoftext|> (id 0)."""
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.append(0)
        ids.extend(encoding.ids)
    ids.append(0)
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------- models


def llama_config(vocab_size: int, hidden: int, heads: int, kv_heads: int, layers: int,
                 intermediate: int, max_len: int) -> dict:
    """A config.json in the long-standing Llama layout (rope_theta, torch_dtype), written by hand so
    the files do not depend on which transformers version trained them."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_len,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }


def build_model(config: dict, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")})
    return LlamaForCausalLM(hf_config).to(device=device, dtype=torch.float32)


def add_training_dropout(model, p: float) -> None:
    """Dropout on the embeddings and on each attention and MLP output before it joins the residual
    stream, in training mode only. The stdlib is small enough that the target learns it by heart
    otherwise. Done with forward hooks, so the saved model is a plain Llama."""
    if p <= 0:
        return

    def drop(module, inputs, output):
        if not module.training:
            return output
        if isinstance(output, tuple):  # attention returns (output, weights)
            return (F.dropout(output[0], p, True), *output[1:])
        return F.dropout(output, p, True)

    model.model.embed_tokens.register_forward_hook(drop)
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(drop)
        layer.mlp.register_forward_hook(drop)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are one parameter


def save_model(model, config: dict, tokenizer, out: Path, max_len: int) -> None:
    """config.json + model.safetensors (bf16) + tokenizer files + generation_config.json."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {
        name: tensor.detach().to(torch.bfloat16).contiguous().cpu()
        for name, tensor in model.state_dict().items()
        if not (name == "lm_head.weight" and config["tie_word_embeddings"])
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": [0, 2], "pad_token_id": 0}, indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(max_len), indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT,
         "additional_special_tokens": [IM_START, IM_END]}, indent=2) + "\n")


def load_saved(path: Path, device: str):
    """The saved bf16 weights, loaded back with transformers and cast to fp32 (exact)."""
    from transformers import LlamaForCausalLM

    model, info = LlamaForCausalLM.from_pretrained(str(path), output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise RuntimeError(f"{path}: transformers could not load every weight: {problems}")
    return model.to(device=device, dtype=torch.float32).eval()


# ----------------------------------------------------------------------------- training


class ProgressBar:
    """rich's progress bar when rich is installed (plain lines otherwise), plus a log line every
    `log_every` steps so that captured logs show the curve too."""

    def __init__(self, title: str, total: int):
        self.title, self.total, self.start = title, total, time.perf_counter()
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
            )
            self.progress.start()
            self.task = self.progress.add_task(title, total=total, loss="-")
        except ImportError:
            self.progress = None

    def set_total(self, total: int) -> None:
        self.total = total
        if self.progress is not None:
            self.progress.update(self.task, total=total)

    def update(self, step: int, loss: float | None) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss="-" if loss is None else f"{loss:.3f}")

    def log(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.start:6.1f}s] {self.title}: {message}"
        if self.progress is not None:
            self.progress.console.print(line, highlight=False, soft_wrap=True)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping [n, seq_len + 1] windows (inputs and shifted targets) covering the stream;
    the last, shorter window is padded with -1 targets that the loss ignores."""
    n = math.ceil((len(stream) - 1) / seq_len)
    out = torch.full((n, seq_len + 1), -1, dtype=torch.long)
    for i in range(n):
        piece = stream[i * seq_len: i * seq_len + seq_len + 1]
        out[i, : len(piece)] = piece
    return out


def logits_of(model, inputs: torch.Tensor) -> torch.Tensor:
    return model(input_ids=inputs.clamp(min=0), use_cache=False).logits.float()


@torch.no_grad()
def mean_nll(model, wins: torch.Tensor, device: str, batch: int, amp: bool) -> float:
    total, count = 0.0, 0
    for i in range(0, len(wins), batch):
        chunk = wins[i: i + batch].to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = logits_of(model, chunk[:, :-1])
        targets = chunk[:, 1:]
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="sum").item()
        count += int((targets >= 0).sum())
    return total / count


@dataclass
class TrainSettings:
    steps: int | None  # None: from epochs, capped by the time budget
    epochs: float
    time_budget: float | None
    batch_size: int
    seq_len: int
    lr: float
    warmup: int
    weight_decay: float = 0.1
    min_lr_ratio: float = 0.1
    distill_weight: float = 0.0  # share of the loss that is cross-entropy against the teacher's distribution


def train(title: str, model, stream: torch.Tensor, valid: torch.Tensor, s: TrainSettings, device: str,
          seed: int, teacher=None) -> dict:
    """AdamW, linear warmup then cosine decay; random windows of the packed stream. Keeps the
    weights with the lowest validation loss. Returns what happened, for the stats file."""
    amp = device.startswith("cuda")
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr, betas=(0.9, 0.95), eps=1e-8, fused=amp,
    )
    tokens_per_step = s.batch_size * s.seq_len
    epoch_steps = max(1, round(s.epochs * len(stream) / tokens_per_step))
    total = s.steps if s.steps is not None else epoch_steps
    # The time budget is checked by timing steps inside the warmup, whose learning rates don't
    # depend on the total: capping the total there gives the same run as `--steps` would.
    calibrate = (min(10, s.warmup // 3), min(40, s.warmup)) if s.time_budget and s.steps is None else None
    valid_wins = windows(valid, s.seq_len)[:64]
    offsets = torch.arange(s.seq_len + 1)
    stream_dev = stream.to(device)

    def lr_at(step: int) -> float:
        if step < s.warmup:
            return s.lr * (step + 1) / s.warmup
        progress = min(1.0, (step - s.warmup) / max(1, total - s.warmup))
        return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    bar = ProgressBar(title, total)
    curve, best = [], (float("inf"), None, -1)
    eval_every = max(1, total // 12)
    started = time.perf_counter()
    t_cal = None
    eval_seconds = 0.0  # kept out of the calibration's step time
    step = 0
    loss_value = None
    model.train()
    while step < total:
        if calibrate and step == calibrate[0]:
            if amp:
                torch.cuda.synchronize()
            t_cal = time.perf_counter() - eval_seconds
        if calibrate and step == calibrate[1]:
            if amp:
                torch.cuda.synchronize()
            per_step = (time.perf_counter() - eval_seconds - t_cal) / (calibrate[1] - calibrate[0])
            # Evaluations and the slower first steps take a share of the budget too.
            fit = int(s.time_budget * 0.9 / per_step)
            if fit < total:
                bar.log(f"{per_step * 1000:.1f} ms/step: {total} steps would not fit in {s.time_budget:.0f}s, "
                        f"training {fit} ({fit * tokens_per_step / len(stream):.1f} epochs)")
                total = max(fit, s.warmup + 1)
                eval_every = max(1, total // 12)
                bar.set_total(total)
            else:
                bar.log(f"{per_step * 1000:.1f} ms/step; {total} steps take about {per_step * total:.0f}s")
            calibrate = None
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(0, len(stream) - s.seq_len - 1, (s.batch_size,), generator=gen)
        batch = stream_dev[(starts[:, None] + offsets).to(device)]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = logits_of(model, inputs)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            if teacher is not None and s.distill_weight > 0:
                with torch.no_grad():
                    soft = torch.softmax(logits_of(teacher, inputs), dim=-1)
                kd = -(soft * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
                loss = (1 - s.distill_weight) * loss + s.distill_weight * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 10 == 0 or step == total:
            loss_value = loss.item()
            bar.update(step, loss_value)
        if step % eval_every == 0 or step == total:
            t_eval = time.perf_counter()
            model.eval()
            val = mean_nll(model, valid_wins, device, 16, amp)
            model.train()
            curve.append({"step": step, "train_loss": round(loss.item(), 4), "valid_loss": round(val, 4)})
            bar.log(f"step {step}/{total} train loss {loss.item():.3f} valid loss {val:.3f} "
                    f"(ppl {math.exp(val):.2f}) lr {lr_at(step - 1):.2e}")
            if val < best[0]:
                best = (val, copy.deepcopy(model.state_dict()), step)
            eval_seconds += time.perf_counter() - t_eval
    bar.close()
    seconds = time.perf_counter() - started
    model.load_state_dict(best[1])
    model.eval()
    return {
        "steps": total, "best_step": best[2], "best_valid_loss": round(best[0], 4),
        "epochs": round(total * tokens_per_step / len(stream), 2), "seconds": round(seconds, 1),
        "tokens_seen": total * tokens_per_step, "batch_size": s.batch_size, "seq_len": s.seq_len,
        "lr": s.lr, "warmup": s.warmup, "weight_decay": s.weight_decay, "min_lr_ratio": s.min_lr_ratio,
        "distill_weight": s.distill_weight, "curve": curve,
    }


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(target, draft, stream: torch.Tensor, seq_len: int, device: str) -> dict:
    """Held-out perplexity of each model (token-weighted over non-overlapping windows, fp32) and the
    share of positions where the draft's greedy next token equals the target's."""
    wins = windows(stream, seq_len)
    nll = {"target": 0.0, "draft": 0.0}
    agree = count = 0
    for i in range(0, len(wins), 8):
        chunk = wins[i: i + 8].to(device)
        inputs, targets = chunk[:, :-1], chunk[:, 1:]
        mask = targets >= 0
        lt, ld = logits_of(target, inputs), logits_of(draft, inputs)
        nll["target"] += F.cross_entropy(lt.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="sum").item()
        nll["draft"] += F.cross_entropy(ld.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="sum").item()
        agree += int(((lt.argmax(-1) == ld.argmax(-1)) & mask).sum())
        count += int(mask.sum())
    return {
        "tokens": count,
        "target_perplexity": round(math.exp(nll["target"] / count), 3),
        "draft_perplexity": round(math.exp(nll["draft"] / count), 3),
        "target_nll": round(nll["target"] / count, 4),
        "draft_nll": round(nll["draft"] / count, 4),
        "greedy_agreement": round(agree / count, 4),
    }


@torch.no_grad()
def greedy_sample(model, tokenizer, prompt: str, n: int, device: str) -> str:
    ids = torch.tensor([tokenizer.encode(prompt).ids], device=device)
    for _ in range(n):
        nxt = logits_of(model, ids)[0, -1].argmax()
        if int(nxt) == 0:
            break
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)


# ----------------------------------------------------------------------------- model card


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def model_card(stats: dict) -> str:
    t, d, ev, data = stats["target"], stats["draft"], stats["held_out"], stats["data"]
    mb = lambda b: f"{b / 1e6:.1f} MB"  # noqa: E731
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [llama, code, python, tiny, speculative-decoding]
---

# vibee-tiny

The model `vibee serve` runs when no `--model` is given: a Llama of {t['params'] / 1e6:.1f}M parameters
that writes Python-looking source, and its draft model of {d['params'] / 1e6:.2f}M parameters
[`../{DRAFT_NAME}`](../{DRAFT_NAME}) for speculative decoding. They are small enough to ship in the
repository and run on a laptop CPU; they are for trying vibee out, not for real work.

| | target (`{TARGET_NAME}`) | draft (`{DRAFT_NAME}`) |
| --- | --- | --- |
| architecture | LlamaForCausalLM, {t['config']['num_hidden_layers']} layers, hidden {t['config']['hidden_size']}, {t['config']['num_attention_heads']} heads / {t['config']['num_key_value_heads']} KV heads (head dim 64), MLP {t['config']['intermediate_size']} | {d['config']['num_hidden_layers']} layers, hidden {d['config']['hidden_size']}, {d['config']['num_attention_heads']} heads / {d['config']['num_key_value_heads']} KV head (head dim 64), MLP {d['config']['intermediate_size']} |
| parameters (tied embeddings) | {t['params']:,} | {d['params']:,} |
| files on disk (bf16 safetensors + tokenizer) | {mb(t['dir_bytes'])} | {mb(d['dir_bytes'])} |
| held-out perplexity | **{ev['target_perplexity']}** | **{ev['draft_perplexity']}** |

- **Draft agreement:** the draft's greedy next token equals the target's at **{ev['greedy_agreement'] * 100:.1f}%**
  of {ev['tokens']:,} held-out positions (teacher-forced on the held-out text).
- **Perplexity:** per token, over {ev['tokens']:,} tokens of held-out files in windows of {stats['eval_len']},
  computed with transformers from the saved bf16 weights cast to fp32. A uniform guess over the
  {stats['vocab_size']:,}-token vocabulary scores {stats['vocab_size']:,}.
- **Tokenizer:** byte-level BPE trained with `tokenizers` on the training files, {stats['vocab_size']:,}
  tokens; `<|endoftext|>` (id 0) separates files and is also BOS/EOS; `<|im_start|>`/`<|im_end|>` (1, 2)
  for the ChatML chat template. Both models share it.

## Data

The `*.py` files of the Python {data['python_version']} standard library ({data['stdlib']}) on the
training machine, sorted, without the `test`/`tests`/`idle_test` directories, installed packages and
the files that hold data rather than code (`pydoc_data/`, the codec tables generated by `gencodec.py`).
A file's split comes from the SHA-256 of its path relative to the stdlib: bucket `hash % 100` below
{HELD_OUT_PERCENT} is held out (reported figures), the next {VALID_PERCENT} validate (best checkpoint), the rest train.

| split | files | bytes | tokens |
| --- | --- | --- | --- |
| train | {data['splits']['train']['files']:,} | {data['splits']['train']['bytes']:,} | {data['tokens']['train']:,} |
| validation | {data['splits']['valid']['files']:,} | {data['splits']['valid']['bytes']:,} | {data['tokens']['valid']:,} |
| held out | {data['splits']['held_out']['files']:,} | {data['splits']['held_out']['bytes']:,} | {data['tokens']['held_out']:,} |

## Training

```
{stats['reproduce_command']}
```

On {stats['device_name']} (torch {stats['versions']['torch']}, transformers {stats['versions']['transformers']}),
{stats['total_seconds']:.0f} s in all. AdamW (betas 0.9/0.95, weight decay 0.1), linear warmup then cosine
decay, {stats['precision']}, random windows of {stats['seq_len']} tokens from the packed training files, seed {stats['seed']}.
The target: {t['train']['steps']:,} steps of {t['train']['batch_size']}×{t['train']['seq_len']} tokens
({t['train']['epochs']} epochs, peak lr {t['train']['lr']}, dropout {stats['dropout']}, {t['train']['seconds']:.0f} s). The draft:
{d['train']['steps']:,} steps ({d['train']['epochs']} epochs, peak lr {d['train']['lr']}, {d['train']['seconds']:.0f} s) on
{100 - round(d['train']['distill_weight'] * 100)}% next-token loss and {round(d['train']['distill_weight'] * 100)}%
cross-entropy against the target's distribution. Each keeps the checkpoint with the lowest
validation loss. Every figure here is also in `training_stats.json`.

Greedy continuation of `def ` by the target:

```python
{stats['samples']['def ']}
```
"""


def draft_card(stats: dict) -> str:
    ev, d = stats["held_out"], stats["draft"]
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [llama, code, python, tiny, speculative-decoding]
---

# vibee-tiny-draft

The draft model for [`../{TARGET_NAME}`](../{TARGET_NAME}) in speculative decoding: {d['params']:,} parameters,
same tokenizer, held-out perplexity {ev['draft_perplexity']}; its greedy next token matches the
target's at {ev['greedy_agreement'] * 100:.1f}% of held-out positions. How it was trained and measured:
[`../{TARGET_NAME}/README.md`](../{TARGET_NAME}/README.md).
"""


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where vibee-tiny/ and vibee-tiny-draft/ go (default: models/, or a temp dir with --quick)")
    p.add_argument("--steps", type=int, default=None, help="target steps (default: from --epochs, capped by --time-budget)")
    p.add_argument("--draft-steps", type=int, default=None, help="draft steps (default: from --draft-epochs, capped)")
    p.add_argument("--epochs", type=float, default=18.0, help="target passes over the training tokens")
    p.add_argument("--draft-epochs", type=float, default=12.0, help="draft passes over the training tokens")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for training both models (target 70%%, draft 30%%); caps the steps")
    # 0.3 over 18 epochs beat 0.1/10 and 0.2/14 on validation loss (held-out perplexity 13.0 against
    # 15.0 and 14.3; 18.6 with no dropout over 7 epochs), on an H100 in November 2026.
    p.add_argument("--dropout", type=float, default=0.3, help="target's dropout while training (0 = none)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=1024,
                   help="training window; the models' full context, so that served prompts never go past what they saw")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few steps on a few files, for tests and smoke runs")
    return p.parse_args(argv)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.seq_len > MAX_LEN:
        fail(f"--seq-len {args.seq_len} is over the models' context of {MAX_LEN} tokens")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is available here (use --device cpu)")
    if args.quick:
        args.steps = args.steps or 3
        args.draft_steps = args.draft_steps or 3
        args.batch_size = min(args.batch_size, 2)
        args.seq_len = min(args.seq_len, 64)
        args.vocab_size = min(args.vocab_size, 512)
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="vibee-tiny-quick-")) if args.quick else REPO / "models")
    eval_len = min(EVAL_LEN, args.seq_len)
    torch.manual_seed(args.seed)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()

    root = stdlib_root()
    corpus = load_corpus(root, args.quick)
    if not corpus.files["train"] or not corpus.files["held_out"] or not corpus.files["valid"]:
        fail(f"found no usable *.py files under the standard library at {root}")
    print(f"data: Python {platform.python_version()} stdlib at {root}: "
          + ", ".join(f"{k} {v['files']} files / {v['bytes'] / 1e6:.2f} MB" for k, v in corpus.summary().items()), flush=True)

    tokenizer = train_tokenizer(corpus.texts("train"), args.vocab_size)
    vocab_size = tokenizer.get_vocab_size()
    streams = {split: encode_stream(tokenizer, corpus.texts(split)) for split in ("train", "valid", "held_out")}
    print(f"tokenizer: {vocab_size} tokens, {sum(len(t.encode()) for t in corpus.texts('train')) / len(streams['train']):.2f} "
          f"bytes/token; train {len(streams['train']):,} tokens, held out {len(streams['held_out']):,} "
          f"({time.perf_counter() - started:.1f}s)", flush=True)

    target_cfg = llama_config(vocab_size, hidden=384, heads=6, kv_heads=2, layers=6, intermediate=1024, max_len=MAX_LEN)
    draft_cfg = llama_config(vocab_size, hidden=128, heads=2, kv_heads=1, layers=2, intermediate=384, max_len=MAX_LEN)
    target = build_model(target_cfg, device)
    add_training_dropout(target, args.dropout)
    draft = build_model(draft_cfg, device)
    target_budget = draft_budget = None
    if args.time_budget:
        target_budget, draft_budget = 0.7 * args.time_budget, 0.3 * args.time_budget
    warmup = 3 if args.quick else 100
    target_run = train(
        "target", target, streams["train"], streams["valid"],
        TrainSettings(steps=args.steps, epochs=args.epochs, time_budget=target_budget, batch_size=args.batch_size,
                      seq_len=args.seq_len, lr=2e-3, warmup=warmup),
        device, args.seed,
    )
    for p in target.parameters():
        p.requires_grad_(False)
    draft_run = train(
        "draft", draft, streams["train"], streams["valid"],
        TrainSettings(steps=args.draft_steps, epochs=args.draft_epochs, time_budget=draft_budget,
                      batch_size=args.batch_size, seq_len=args.seq_len, lr=3e-3, warmup=warmup,
                      distill_weight=0.7),
        device, args.seed + 1, teacher=target,
    )

    target_dir, draft_dir = out_dir / TARGET_NAME, out_dir / DRAFT_NAME
    save_model(target, target_cfg, tokenizer, target_dir, MAX_LEN)
    save_model(draft, draft_cfg, tokenizer, draft_dir, MAX_LEN)
    del target, draft
    saved_target, saved_draft = load_saved(target_dir, device), load_saved(draft_dir, device)
    held_out = evaluate(saved_target, saved_draft, streams["held_out"], eval_len, device)
    print(f"held out: target perplexity {held_out['target_perplexity']}, draft {held_out['draft_perplexity']}, "
          f"greedy agreement {held_out['greedy_agreement'] * 100:.1f}% over {held_out['tokens']:,} tokens", flush=True)
    samples = {p: greedy_sample(saved_target, tokenizer, p, 48, device) for p in ("def ", "import ")}

    import tokenizers
    import transformers

    reproduce = ["python", "scripts/train_default_model.py", "--device", device.split(":")[0],
                 "--steps", str(target_run["steps"]), "--draft-steps", str(draft_run["steps"]),
                 "--dropout", str(args.dropout), "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    for flag, value, default in (("--seq-len", args.seq_len, 1024), ("--vocab-size", args.vocab_size, 4096)):
        if value != default and not args.quick:
            reproduce += [flag, str(value)]
    if args.quick:
        reproduce.append("--quick")
    stats = {
        "command": "python scripts/train_default_model.py " + shlex.join(argv),
        "reproduce_command": shlex.join(reproduce),
        "precision": "bf16 autocast" if device.startswith("cuda") else "fp32",
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()})",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "seed": args.seed, "dropout": args.dropout, "seq_len": args.seq_len, "eval_len": eval_len, "vocab_size": vocab_size, "quick": args.quick,
        "data": {
            "python_version": platform.python_version(), "stdlib": str(root),
            "splits": corpus.summary(), "skipped_undecodable_files": corpus.skipped_undecodable,
            "tokens": {k: len(v) for k, v in streams.items()},
            "split_rule": f"sha256(relative path)[:8] big-endian % 100: < {HELD_OUT_PERCENT} held_out, "
                          f"< {HELD_OUT_PERCENT + VALID_PERCENT} valid, else train",
            "held_out_files": [rel for rel, _ in corpus.files["held_out"]],
        },
        "target": {"params": count_params(saved_target), "config": target_cfg, "train": target_run},
        "draft": {"params": count_params(saved_draft), "config": draft_cfg, "train": draft_run},
        "held_out": held_out,
        "samples": samples,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    stats["target"]["dir_bytes"] = dir_bytes(target_dir)  # before the card and stats are added
    stats["draft"]["dir_bytes"] = dir_bytes(draft_dir)
    (draft_dir / "README.md").write_text(draft_card(stats))
    stats["draft"]["dir_bytes"] = dir_bytes(draft_dir)
    # The card states the sizes including itself; two passes settle the figures.
    for _ in range(2):
        (target_dir / "README.md").write_text(model_card(stats))
        (target_dir / "training_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        stats["target"]["dir_bytes"] = dir_bytes(target_dir)
    total_bytes = dir_bytes(target_dir) + dir_bytes(draft_dir)
    print(f"wrote {target_dir} ({dir_bytes(target_dir) / 1e6:.2f} MB) and {draft_dir} "
          f"({dir_bytes(draft_dir) / 1e6:.2f} MB) in {stats['total_seconds']:.0f}s", flush=True)
    if total_bytes > MAX_TOTAL_BYTES:
        fail(f"the two model directories take {total_bytes / 1e6:.1f} MB, over the {MAX_TOTAL_BYTES / 1e6:.0f} MB limit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
