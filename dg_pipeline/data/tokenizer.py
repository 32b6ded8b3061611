"""The board tokenizer the Sudoku recipes build and save with the model: a real PreTrainedTokenizerFast.

One token per character; ids are fixed so data, sampler and scorer agree (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "eos_token": "<eos>",
    "bos_token": "<bos>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
    "sep_token": "<sep>",
}
# Order fixes the ids: <pad>=0 <eos>=1 <bos>=2 <unk>=3 <mask>=4 <sep>=5, then '0'..'9' = 6..15 ('0' = blank).
VOCAB = list(SPECIAL_TOKENS.values()) + [str(d) for d in range(10)]


def build_board_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    # A special token, or else any single character, is one token.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("<[a-z]+>|."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS.values()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens(dict(SPECIAL_TOKENS))
    return tokenizer


# A Gemma-style turn format (assistant turns are "model"), small enough to read in a test failure.
CHAR_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_char_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A tiny character-level text tokenizer (printable ASCII + newline) for chat-data tests and examples.

    Same special ids as the board tokenizer (<pad>=0 <eos>=1 <bos>=2 ...), plus <start_of_turn>/<end_of_turn> for
    its Gemma-style chat template (dropped with chat_template=False, to exercise the plain-text path).
    """
    turn_tokens = ["<start_of_turn>", "<end_of_turn>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS.values()) + turn_tokens + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("<[a-z_]+>|."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS.values()) + turn_tokens)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({**SPECIAL_TOKENS, "additional_special_tokens": turn_tokens})
    if chat_template:
        tokenizer.chat_template = CHAR_CHAT_TEMPLATE
    return tokenizer
