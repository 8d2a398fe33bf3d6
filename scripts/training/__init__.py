"""The parts of scripts/train_default_model.py, one concept a module.

corpus (the stdlib files and their splits) -> tokenizer (BPE, special tokens, chat template) ->
token_stream (packed ids, windows) -> models (the Llamas and their Hugging Face files) ->
train_loop (one model's training run, with progress from progress) -> evaluation (held-out
figures) -> model_card (README.md and training_stats.json). The script wires them together.
"""
