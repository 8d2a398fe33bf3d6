"""The Medusa heads' section of the model card and their entry in training_stats.json."""

from __future__ import annotations

import json
from pathlib import Path

BEGIN, END = "<!-- medusa heads: written by scripts/train_medusa_heads.py -->", "<!-- end of medusa heads -->"


def heads_section(stats: dict) -> str:
    held, run = stats["held_out"], stats["train"]
    per_head = " | ".join(f"{a * 100:.1f}%" for a in held["head_top1"])
    versus = " | ".join(f"{a * 100:.1f}%" for a in held["head_top1_vs_target_greedy"])
    columns = " | ".join(f"head {i + 1} (token t+{i + 2})" for i in range(stats["num_heads"]))
    return f"""{BEGIN}
## Medusa heads

`medusa_heads.safetensors` ({stats['file_bytes'] / 1e6:.2f} MB, bf16): {stats['num_heads']} heads for
`vibee serve --speculative-method medusa`, {stats['params']:,} parameters. Head i reads the target's final
hidden state h at position t and guesses token t + 1 + i as argmax lm_head(h + SiLU(W_i h + b_i)), with
the target's own tied lm_head (the generated `MedusaHeads` of `specs/tri/igla_speculative_decode.vibee`).
Trained with the target frozen on its training split: the hidden states of {stats['cached_train_positions']:,}
of its {stats['train_tokens']:,} tokens (whole windows spread over the split), cross-entropy against the text's tokens,
loss weights {', '.join(str(w) for w in run['head_loss_weights'])}:

```
{stats['reproduce_command']}
```

{run['steps']:,} steps of {run['batch_size']} positions ({run['epochs']} epochs, peak lr {run['lr']}, seed {stats['seed']}) in
{run['seconds']:.0f} s after a {stats['target_forward_seconds']:.0f} s forward of the target, on {stats['device_name']}
(torch {stats['versions']['torch']}, Python {stats['versions']['python']} stdlib).

Held-out top-1 accuracy over {held['positions']:,} positions (fp32; the target's own next-token top-1 is
{held['target_next_token_top1'] * 100:.1f}%, always guessing the most frequent token {held['unigram_top1'] * 100:.1f}%):

| | {columns} |
| --- | {' | '.join('---' for _ in held['head_top1'])} |
| the text's token | {per_head} |
| the target's greedy token there (teacher-forced) | {versus} |
{END}
"""


def write_heads_card(stats: dict, model_dir: Path) -> None:
    """Replace (or append) the heads' section of README.md; stats under 'medusa_heads' in training_stats.json."""
    card_path = model_dir / "README.md"
    card = card_path.read_text()
    if BEGIN in card:
        card = card[: card.index(BEGIN)] + card[card.index(END) + len(END) + 1:]
    card_path.write_text(card.rstrip("\n") + "\n\n" + heads_section(stats))
    stats_path = model_dir / "training_stats.json"
    all_stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    all_stats["medusa_heads"] = stats
    stats_path.write_text(json.dumps(all_stats, indent=2) + "\n")
