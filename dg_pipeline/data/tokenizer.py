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


# --------------------------------------------------------------------------------------------- identity

# Written beside the tokenizer files of every model dir and bundle: the hash of the tokenizer the weights were
# trained with. A tokenizer that maps any token to another id (e.g. two digits swapped) fails on load, naming both
# files, instead of decoding wrong answers that a gate may still pass.
TOKENIZER_RECORD = "tokenizer_identity.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what decides token ids: the vocabulary (token -> id, added tokens included) and the special ids."""
    import hashlib
    import json

    special = {name: getattr(tokenizer, f"{name}_id", None) for name in ("pad_token", "eos_token", "bos_token",
                                                                      "unk_token", "mask_token")}
    blob = json.dumps({"vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0])),
                       "special": special}, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_tokenizer(tokenizer, out_dir) -> None:
    """The tokenizer files and TOKENIZER_RECORD (its hash) into `out_dir`."""
    from pathlib import Path

    from dg_pipeline.core.io import atomic_write_json

    tokenizer.save_pretrained(out_dir)
    atomic_write_json(Path(out_dir) / TOKENIZER_RECORD, {"sha256": tokenizer_hash(tokenizer), "tokens": len(tokenizer)})


def tokenizer_mismatch(tokenizer, model_dir) -> str | None:
    """Why `tokenizer` (loaded from `model_dir`) is not the one recorded there, or None (no record: a dir another
    tool wrote, nothing to compare)."""
    from pathlib import Path

    from dg_pipeline.core.io import read_json

    record_path = Path(model_dir) / TOKENIZER_RECORD
    if not record_path.is_file():
        return None
    recorded = read_json(record_path).get("sha256")
    now = tokenizer_hash(tokenizer)
    if recorded == now:
        return None
    tokenizer_file = next((Path(model_dir) / f for f in TOKENIZER_FILES if (Path(model_dir) / f).exists()),
                          Path(model_dir) / TOKENIZER_FILES[0])
    return (f"{tokenizer_file}: this tokenizer (sha256 {now[:12]}) is not the one the weights were saved with "
            f"(sha256 {str(recorded)[:12]}, recorded in {record_path}): some tokens map to other ids. Restore the "
            f"tokenizer files the model was trained with (e.g. from its input dir), or retrain with this tokenizer")
