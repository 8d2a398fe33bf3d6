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
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

# The parts live in the package scripts/training/ next to this file. scripts/ is neither a package
# nor installed, so its folder goes on sys.path: `python scripts/train_default_model.py` puts it
# there by itself, but loading this file by path (tests/test_default_model.py) does not.
SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from training.corpus import HELD_OUT_PERCENT, VALID_PERCENT, load_corpus, stdlib_root  # noqa: E402
from training.evaluation import EVAL_LEN, evaluate, greedy_sample  # noqa: E402
from training.model_card import write_cards_and_stats  # noqa: E402
from training.models import (  # noqa: E402
    DRAFT_NAME, MAX_LEN, MAX_TOTAL_BYTES, TARGET_NAME, add_training_dropout, build_model, count_params, dir_bytes,
    llama_config, load_saved, save_model,
)
from training.token_stream import encode_stream  # noqa: E402
from training.tokenizer import train_tokenizer  # noqa: E402
from training.train_loop import TrainSettings, train  # noqa: E402

REPO = SCRIPTS.parent


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
    write_cards_and_stats(stats, target_dir, draft_dir)
    total_bytes = dir_bytes(target_dir) + dir_bytes(draft_dir)
    print(f"wrote {target_dir} ({dir_bytes(target_dir) / 1e6:.2f} MB) and {draft_dir} "
          f"({dir_bytes(draft_dir) / 1e6:.2f} MB) in {stats['total_seconds']:.0f}s", flush=True)
    if total_bytes > MAX_TOTAL_BYTES:
        fail(f"the two model directories take {total_bytes / 1e6:.1f} MB, over the {MAX_TOTAL_BYTES / 1e6:.0f} MB limit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
