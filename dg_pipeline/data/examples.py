"""Examples: token ids of one training/eval row (docs/ARCHITECTURE.md, data contract).

`Example(prompt_ids, response_ids, meta)`: `response_ids` ends with EOS and holds no padding; `meta` carries what
the scorer needs. Sudoku: prompt `<bos> board <sep>`, response `solution <eos>`, meta {puzzle, solution}, and on
eval rows eval_source (the board source, reported apart by the gate). Chat: prompt = the turns before the final
assistant turn (the tokenizer's chat template with the generation prompt, when it has one); response = exactly
what the template writes for the final assistant turn after that prompt, through its end-of-turn token (the first
of the model's eos ids, e.g. Gemma 4's <turn|>; what the template writes after it, such as the newline between
turns, is never generated: sampling stops there); without a template, completion tokens + EOS.
meta {prompt, completion, source}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

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
    messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, use_chat_template: bool = True
) -> str:
    """The prompt text: the chat template with the generation prompt when the tokenizer has one, else the turns'
    contents joined by newlines."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return _render(messages, tokenizer, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


def _render(messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, add_generation_prompt: bool) -> str:
    # OpenAI's developer role is the system role of templates that do not know it (Gemma's, most others).
    if "developer" not in tokenizer.chat_template:
        messages = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def stop_ids_for(tokenizer: PreTrainedTokenizerBase, eos_token_ids: Sequence[int] | None) -> tuple[int, ...]:
    """The ids generation stops at: the model's eos list when given (its generation_config.json), else the
    tokenizer's eos token."""
    if eos_token_ids:
        return tuple(int(i) for i in eos_token_ids)
    if tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no eos_token (fix: set eos_token in the model dir's tokenizer_config.json)")
    return (tokenizer.eos_token_id,)


def templated_turn(record: ChatRecord, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """(prompt text, the text the chat template writes for the final assistant turn after it).

    Refuses, naming the row, a template whose generation prompt is not a prefix of the rendered conversation, and
    any tool_calls / reasoning_content the template would drop (rendering with and without them is the same)."""
    prompt = _render(record.prompt_messages, tokenizer, add_generation_prompt=True)
    full = _render([*record.prompt_messages, record.response], tokenizer, add_generation_prompt=False)
    for i, message in enumerate([*record.prompt_messages, record.response]):
        keys = ("tool_calls", "reasoning_content") if i == len(record.prompt_messages) else ("tool_calls",)
        for key in (k for k in keys if message.get(k)):
            stripped = [*record.prompt_messages, record.response]
            stripped[i] = {k: v for k, v in message.items() if k != key}
            if _render(stripped, tokenizer, add_generation_prompt=False) == full:
                raise InputError(
                    f"{record.where}: message {i} has \"{key}\" but the tokenizer's chat template does not render "
                    f"it, so training would silently drop it (fix: use a chat template that renders {key}, fold it "
                    f"into \"content\", or remove the key)"
                )
    if not full.startswith(prompt):
        raise InputError(
            f"{record.where}: the chat template does not write this conversation as the prompt (with its generation "
            f"prompt) followed by the assistant turn, so the assistant's tokens cannot be told apart (fix: use a "
            f"template whose generation prompt starts the assistant turn, or data.chat_template=false)"
        )
    return prompt, full[len(prompt):]


def through_first_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int] | None:
    """`ids` up to and including the first stop id; None when there is none."""
    for i, t in enumerate(ids):
        if t in stop_ids:
            return list(ids[: i + 1])
    return None


def chat_example(
    record: ChatRecord,
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_length: int | None = None,
    use_chat_template: bool = True,
    eos_token_ids: Sequence[int] | None = None,
) -> Example:
    """Tokenise one chat row (module doc); `eos_token_ids`: the model's stop ids (None = the tokenizer's eos). A
    prompt over `max_prompt_length` tokens, or a templated turn without any stop id, is an error naming the row."""
    stop_ids = stop_ids_for(tokenizer, eos_token_ids)
    templated = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    if templated:
        prompt_text, turn_text = templated_turn(record, tokenizer)
        # A chat template writes its own <bos> and turn tokens.
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        turn_ids = tokenizer(turn_text, add_special_tokens=False)["input_ids"]
        response_ids = through_first_stop(turn_ids, stop_ids)
        if response_ids is None:
            raise InputError(
                f"{record.where}: the chat template ends the assistant turn ({turn_text[-40:]!r}) with none of the "
                f"model's eos ids {list(stop_ids)}: a model trained on it would never stop (fix: add the template's "
                f"end-of-turn token id to eos_token_id in the model's generation_config.json)"
            )
    else:
        for key in ("tool_calls", "reasoning_content"):
            if any(m.get(key) for m in (*record.prompt_messages, record.response)):
                raise InputError(
                    f"{record.where}: \"{key}\" needs a chat template to be written into the text; without one "
                    f"(data.chat_template=false, or the tokenizer has none) only the messages' content is used and "
                    f"it would be dropped (fix: use the model's chat template, or remove the key)"
                )
        prompt_text = render_prompt(record.prompt_messages, tokenizer, use_chat_template=False)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
        stop = tokenizer.eos_token_id if tokenizer.eos_token_id in stop_ids else stop_ids[0]
        response_ids = [*tokenizer(record.completion, add_special_tokens=False)["input_ids"], stop]
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        raise InputError(
            f"{record.where}: prompt is {len(prompt_ids)} tokens, longer than data.max_prompt_length="
            f"{max_prompt_length} (fix: shorten or drop the row, or raise data.max_prompt_length)"
        )
    return Example(
        prompt_ids=list(prompt_ids),
        response_ids=response_ids,
        meta={"prompt": prompt_text, "completion": record.completion, "source": record.where},
    )


def chat_examples(
    records: Iterable[ChatRecord],
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_length: int | None = None,
    use_chat_template: bool = True,
    eos_token_ids: Sequence[int] | None = None,
) -> list[Example]:
    return [chat_example(r, tokenizer, max_prompt_length, use_chat_template, eos_token_ids) for r in records]
