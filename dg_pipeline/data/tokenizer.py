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


# Gemma 4's control tokens at Gemma 4's ids (the rest of 5..104 are <unusedN> placeholders), so the fixture's stop
# ids are the released model's: <eos>=1, <|tool_response>=50, <turn|>=106 (its generation_config.json eos list).
GEMMA4_CONTROL_TOKENS = {
    46: '<|"|>', 47: "<|tool>", 48: "<tool|>", 49: "<|tool_call>", 50: "<|tool_response>", 51: "<tool_call|>",
    52: "<tool_response|>", 98: "<|think|>", 100: "<|channel>", 101: "<channel|>", 105: "<|turn>", 106: "<turn|>",
}
TURN_START, TURN_END = "<|turn>", "<turn|>"
# What a Gemma 4 chat checkpoint stops at (<eos>, <turn|>); the tokenizer's own eos_token is <eos> alone.
CHAT_EOS_IDS = (1, 106)

# A Gemma-4-like chat template, small enough to read in a test failure: assistant turns are "model" turns, the
# developer role is a system turn, list content keeps its text parts, the supervised (last) assistant turn renders its
# reasoning in a thought channel, and tool calls / tool responses use Gemma 4's tokens. Every turn ends with <turn|>.
CHAR_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% set role = {'assistant': 'model', 'developer': 'system'}.get(m['role'], m['role']) %}"
    "<|turn>{{ role }}\n"
    "{% if m['role'] == 'assistant' and loop.last and m.get('reasoning_content') %}"
    "<|channel>thought\n{{ m['reasoning_content'] }}<channel|>"
    "{% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% for call in m.get('tool_calls') or [] %}"
    "<|tool_call>call:{{ call['function']['name'] }}{{ call['function']['arguments'] | tojson }}<tool_call|>"
    "{% endfor %}"
    "<turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


def build_char_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A tiny character-level, Gemma-4-like chat tokenizer (printable ASCII + newline) for chat tests and examples.

    Gemma's special ids (<pad>=0 <eos>=1 <bos>=2 <unk>=3 <mask>=4), Gemma 4's control tokens at their released ids
    (<|turn>=105, <turn|>=106, ...), then one token per character from 107; the Gemma-4-like chat template (dropped
    with chat_template=False, to exercise the plain-text path). A model for it stops at CHAT_EOS_IDS.
    """
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    control = [GEMMA4_CONTROL_TOKENS.get(i, f"<unused{i}>") for i in range(len(specials), 107)]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(specials + control + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # A special or control token (<name>, <|name>, <name|>, <|"|>), or else any single character, is one token.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r'<\|"\|>|<\|?[a-z_0-9]+\|?>|.'), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials + control)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>",
                                  "unk_token": "<unk>", "mask_token": "<mask>", "additional_special_tokens": control})
    if chat_template:
        tokenizer.chat_template = CHAR_CHAT_TEMPLATE
    return tokenizer
