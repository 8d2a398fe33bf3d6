"""The engine side of vibee: model, loader, tokenizer, attention, engine."""
