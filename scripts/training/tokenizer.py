"""The byte-level BPE tokenizer both models share: its pre-token split, special tokens and chat template."""

from __future__ import annotations

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
