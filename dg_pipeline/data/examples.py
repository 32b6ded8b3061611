"""Examples: token ids of one training/eval row (docs/ARCHITECTURE.md, data contract).

`Example(prompt_ids, response_ids, meta)`: `response_ids` ends with EOS and holds no padding; `meta` carries what
the scorer needs. Sudoku: prompt `<bos> board <sep>`, response `solution <eos>`, meta {puzzle, solution}, and on
eval rows eval_source (the board source, reported apart by the gate). Chat: prompt = the turns before the final assistant turn (the tokenizer's chat template with the generation
prompt, when it has one), response = completion tokens + EOS, meta {prompt, completion, source}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from transformers import PreTrainedTokenizerBase

from dg_pipeline.core.errors import InputError
from dg_pipeline.data.readers import ChatRecord
from dg_pipeline.data.sudoku import Board


@dataclass
class Example:
    prompt_ids: list[int]
    response_ids: list[int]
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- sudoku


class BoardCodec:
    """Board string <-> token ids through the board tokenizer's vocabulary (one token per cell, '.' = '0')."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        vocab = tokenizer.get_vocab()
        needed = [tokenizer.bos_token, tokenizer.sep_token, tokenizer.eos_token, *"0123456789"]
        missing = [t for t in needed if t is None or t not in vocab]
        if missing:
            raise InputError(
                f"data.kind=sudoku needs the board tokenizer (<bos>, <sep>, <eos> and one token per digit); this "
                f"tokenizer lacks {missing} (fix: start from a model built by stage=base for a sudoku recipe, "
                f"or use data.kind=chat with prompt/completion JSONL for a text tokenizer)"
            )
        self.digit_ids = {d: vocab[d] for d in "0123456789"}
        self.digit_ids["."] = self.digit_ids["0"]
        self.bos_id, self.sep_id = vocab[tokenizer.bos_token], vocab[tokenizer.sep_token]
        self.eos_id = vocab[tokenizer.eos_token]
        self._digit_of = {i: d for d, i in self.digit_ids.items() if d != "."}

    def encode(self, board: str) -> list[int]:
        return [self.digit_ids[ch] for ch in board]

    def decode(self, ids: Iterable[int]) -> str:
        """Digits of `ids` (stops at EOS; any non-digit token becomes '?', so a bad answer never looks solved)."""
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            out.append(self._digit_of.get(int(i), "?"))
        return "".join(out)

    def prompt_length(self, size: int) -> int:
        return size * size + 2  # <bos> + cells + <sep>


def sudoku_example(board: Board, codec: BoardCodec, eval_source: str | None = None) -> Example:
    """`eval_source`: which board source an eval example comes from (the gate reports each apart)."""
    meta = {"puzzle": board.puzzle, "solution": board.solution}
    if eval_source is not None:
        meta["eval_source"] = eval_source
    return Example(
        prompt_ids=[codec.bos_id, *codec.encode(board.puzzle), codec.sep_id],
        response_ids=[*codec.encode(board.solution), codec.eos_id],
        meta=meta,
    )


def sudoku_examples(
    boards: Iterable[Board], tokenizer: PreTrainedTokenizerBase, eval_source: str | None = None
) -> list[Example]:
    codec = BoardCodec(tokenizer)
    return [sudoku_example(b, codec, eval_source) for b in boards]


# --------------------------------------------------------------------------------------------- chat


def render_prompt(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, use_chat_template: bool = True
) -> str:
    """The prompt text: the chat template with the generation prompt when the tokenizer has one, else the turns'
    contents joined by newlines."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


def chat_example(
    record: ChatRecord,
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_length: int | None = None,
    use_chat_template: bool = True,
) -> Example:
    """Tokenise one chat row; a prompt over `max_prompt_length` tokens is an error naming the row's file:line."""
    if tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no eos_token (fix: set eos_token in the model dir's tokenizer_config.json)")
    templated = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    prompt_text = render_prompt(record.prompt_messages, tokenizer, use_chat_template)
    # A chat template writes its own <bos>; plain text gets the tokenizer's usual special tokens.
    prompt_ids = tokenizer(prompt_text, add_special_tokens=not templated)["input_ids"]
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        raise InputError(
            f"{record.where}: prompt is {len(prompt_ids)} tokens, longer than data.max_prompt_length="
            f"{max_prompt_length} (fix: shorten or drop the row, or raise data.max_prompt_length)"
        )
    completion_ids = tokenizer(record.completion, add_special_tokens=False)["input_ids"]
    return Example(
        prompt_ids=list(prompt_ids),
        response_ids=[*completion_ids, tokenizer.eos_token_id],
        meta={"prompt": prompt_text, "completion": record.completion, "source": record.where},
    )


def chat_examples(
    records: Iterable[ChatRecord],
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_length: int | None = None,
    use_chat_template: bool = True,
) -> list[Example]:
    return [chat_example(r, tokenizer, max_prompt_length, use_chat_template) for r in records]
