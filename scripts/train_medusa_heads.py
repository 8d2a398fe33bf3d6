"""Train Medusa heads for the built-in model (or any model this repository trained) on its own training data.

    python scripts/train_medusa_heads.py                     # -> models/vibee-tiny/medusa_heads.safetensors
    python scripts/train_medusa_heads.py --quick --out /tmp/heads.safetensors   # smoke run

The target is frozen: its final hidden states over the stdlib training split (the same files and
split as scripts/train_default_model.py, tokenized with the model's own tokenizer) are computed
once, then k heads (the generated MedusaHeads of the speculative_decode spec) learn to guess the
tokens 2 .. k + 1 positions ahead. Runs on a CPU in minutes. The heads are written as bf16
safetensors next to the model; their held-out top-1 accuracy per head goes into the model's
training_stats.json and README.md. `vibee serve --speculative-method medusa` drafts with them.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
for path in (SCRIPTS, REPO / "output"):  # the training package; the generated MedusaHeads
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from training.corpus import load_corpus, stdlib_root  # noqa: E402
from training.medusa import HeadSettings, cache_hidden, head_accuracy, head_targets, train_heads  # noqa: E402
from training.medusa_card import write_heads_card  # noqa: E402
from training.models import DRAFT_NAME, MAX_TOTAL_BYTES, TARGET_NAME, dir_bytes, load_saved  # noqa: E402
from training.token_stream import encode_stream  # noqa: E402
from vibee_gen.igla_speculative_decode import MedusaHeads  # noqa: E402

HEADS_FILE = "medusa_heads.safetensors"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, default=REPO / "models" / TARGET_NAME, help="the frozen target's directory")
    p.add_argument("--out", type=Path, default=None, help=f"heads file (default: MODEL/{HEADS_FILE}, and the card is updated)")
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: from --epochs, capped by --time-budget)")
    p.add_argument("--epochs", type=float, default=3.0, help="passes over the training positions")
    p.add_argument("--time-budget", type=float, default=360.0, help="seconds for the heads' training; caps the steps")
    p.add_argument("--batch-size", type=int, default=2048, help="positions per step")
    p.add_argument("--lr", type=float, default=2e-3)
    # The frozen target's forward is most of the time on a CPU (~2k tokens/s on two cores): a third
    # of the training split, spread over all of it, keeps the run near ten minutes.
    p.add_argument("--max-train-tokens", type=int, default=600_000,
                   help="training tokens whose hidden states are cached (0: all of the split)")
    p.add_argument("--seq-len", type=int, default=1024, help="window of the cached forward (the model's context)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few files and steps, for tests and smoke runs")
    return p.parse_args(argv)


DEFAULTS = vars(parse_args([]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    if args.quick:
        args.epochs, args.seq_len, args.batch_size = min(args.epochs, 0.05), min(args.seq_len, 128), min(args.batch_size, 256)
        args.max_train_tokens = min(args.max_train_tokens or 4_000, 4_000)
    target = load_saved(args.model, "cpu")
    for p in target.parameters():
        p.requires_grad_(False)
    lm_head = target.get_output_embeddings().weight.detach()
    tokenizer = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    root = stdlib_root()
    corpus = load_corpus(root, args.quick)
    streams = {split: encode_stream(tokenizer, corpus.texts(split)) for split in ("train", "held_out")}
    print(f"data: Python {platform.python_version()} stdlib at {root}: train {len(streams['train']):,} tokens, "
          f"held out {len(streams['held_out']):,}", flush=True)

    t0 = time.perf_counter()
    hidden, positions = cache_hidden(target, streams["train"], args.seq_len, 4, "target forward (train)",
                                     args.max_train_tokens or None)
    held_hidden, _ = cache_hidden(target, streams["held_out"], args.seq_len, 4, "target forward (held out)")
    forward_seconds = round(time.perf_counter() - t0, 1)
    heads = MedusaHeads(args.num_heads, target.config.hidden_size)
    settings = HeadSettings(num_heads=args.num_heads, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            warmup=3 if args.quick else 50, time_budget=args.time_budget)
    targets = head_targets(streams["train"], positions, args.num_heads)
    run = train_heads(heads, lm_head, hidden, targets, settings, args.seed)
    heads.eval()
    accuracy = head_accuracy(heads, lm_head, held_hidden, streams["held_out"])
    print("held out top-1 per head: " + ", ".join(f"head {i + 1} {a * 100:.1f}%" for i, a in enumerate(accuracy["head_top1"]))
          + f" (target's next token {accuracy['target_next_token_top1'] * 100:.1f}%, unigram {accuracy['unigram_top1'] * 100:.1f}%)",
          flush=True)

    out = args.out or args.model / HEADS_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().to(torch.bfloat16).contiguous() for name, t in heads.state_dict().items()}
    save_file(state, str(out), metadata={"format": "pt", "num_heads": str(args.num_heads),
                                         "hidden_size": str(target.config.hidden_size), "base_model": args.model.name})
    reproduce = ["python", "scripts/train_medusa_heads.py", "--steps", str(run["steps"]), "--seed", str(args.seed)]
    for flag in ("num_heads", "batch_size", "lr", "seq_len", "max_train_tokens"):
        if getattr(args, flag) != DEFAULTS[flag] and not args.quick:
            reproduce += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    stats = {
        "command": shlex.join(["python", "scripts/train_medusa_heads.py", *argv]),
        "reproduce_command": shlex.join(reproduce + (["--quick"] if args.quick else [])),
        "device_name": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "seed": args.seed, "num_heads": args.num_heads, "hidden_size": target.config.hidden_size,
        "params": sum(p.numel() for p in heads.parameters()), "file_bytes": out.stat().st_size,
        "train_tokens": len(streams["train"]), "cached_train_positions": len(positions), "held_out_tokens": len(streams["held_out"]),
        "target_forward_seconds": forward_seconds, "train": run, "held_out": accuracy,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) in {stats['total_seconds']:.0f}s", flush=True)
    if args.out is None:  # the shipped heads: the model's card and stats say what they are
        write_heads_card(stats, args.model)
        draft = args.model.parent / DRAFT_NAME
        total = dir_bytes(args.model) + (dir_bytes(draft) if draft.is_dir() else 0)
        if total > MAX_TOTAL_BYTES:
            print(f"error: the model directories take {total / 1e6:.1f} MB, over {MAX_TOTAL_BYTES / 1e6:.0f} MB", file=sys.stderr)
            return 2
    else:
        out.with_suffix(".json").write_text(json.dumps(stats, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
