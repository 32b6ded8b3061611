"""Readers (and the one writer) for local data files: Kaggle Sudoku CSV, board JSONL, chat SFT JSONL.

Every bad row is one InputError `path:LINE: what is wrong (fix: how)`; blank lines are skipped.

- Kaggle CSV: a header with `quizzes,solutions` (or `puzzle,solution`; other columns are ignored), one board per
  row, `0` or `.` = blank.
- Board JSONL: `{"puzzle": "...", "solution": "..."}` per line.
- Chat JSONL: `{"prompt": "...", "completion": "..."}` or `{"messages": [{"role", "content"}, ...]}` per line
  (OpenAI chat format); single-turn SFT: the final message must be the assistant's (the supervised response), the
  ones before it are the prompt. Roles: system, developer, user, assistant, tool. `content` is a string or a list of
  OpenAI content parts, of which text parts are kept (joined) and any other part type is an error naming it. An
  assistant message's `tool_calls` and `reasoning_content` are kept for the chat template to render (the data
  package refuses them where the template would drop them: dg_pipeline.data.examples).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from dg_pipeline.core.errors import InputError
from dg_pipeline.core.io import atomic_write_text
from dg_pipeline.data.sudoku import Board, BoardError, size_for_length, validate_board

# Accepted (puzzle, solution) column pairs of a Sudoku CSV header.
CSV_COLUMNS = (("quizzes", "solutions"), ("puzzle", "solution"))
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# Message keys kept besides role and content, for the chat template (OpenAI / transformers chat format).
CHAT_EXTRA_KEYS = ("tool_calls", "reasoning_content", "tool_call_id", "name")


# --------------------------------------------------------------------------------------------- boards


def read_boards(path: str | os.PathLike, size: int | None = None, limit: int | None = None) -> list[Board]:
    """Boards from a Kaggle CSV or a JSONL file (by extension: .csv / .jsonl / .json; else by the content)."""
    path = _existing(path)
    if _looks_like_jsonl(path):
        return read_boards_jsonl(path, size, limit)
    return read_kaggle_csv(path, size, limit)


def read_kaggle_csv(path: str | os.PathLike, size: int | None = None, limit: int | None = None) -> list[Board]:
    """Boards from a CSV with a `quizzes,solutions` header ('.' blanks are normalised to '0')."""
    path = _existing(path)
    boards: list[Board] = []
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a spreadsheet's BOM is not a header
        rows = csv.reader(f)
        header = next(rows, None)
        puzzle_col, solution_col = _csv_columns(path, header)
        width = len(header)
        for row in rows:
            if limit is not None and len(boards) >= limit:
                break
            if not row or not "".join(row).strip():
                continue
            where = f"{path}:{rows.line_num}"
            if len(row) != width:
                raise InputError(
                    f"{where}: row has {len(row)} field(s), the header has {width} "
                    f"(fix: write one `puzzle,solution` pair per line, no stray commas)"
                )
            boards.append(_validated(where, row[puzzle_col], row[solution_col], size))
            size = size or size_for_length(len(boards[-1].puzzle))
    return boards


def read_boards_jsonl(path: str | os.PathLike, size: int | None = None, limit: int | None = None) -> list[Board]:
    """Boards from a JSONL file of {"puzzle": "...", "solution": "..."} objects."""
    boards: list[Board] = []
    for where, obj in _jsonl_objects(path):
        if limit is not None and len(boards) >= limit:
            break
        missing = [k for k in ("puzzle", "solution") if k not in obj]
        if missing:
            raise InputError(
                f"{where}: missing key {missing[0]!r} (fix: each line is "
                '{"puzzle": "<digits, 0 = blank>", "solution": "<digits>"})'
            )
        for key in ("puzzle", "solution"):
            if not isinstance(obj[key], str):
                kind = type(obj[key]).__name__
                raise InputError(f"{where}: {key!r} is a {kind}, not a string (fix: quote the digits)")
        boards.append(_validated(where, obj["puzzle"], obj["solution"], size))
        size = size or size_for_length(len(boards[-1].puzzle))  # later rows must match the first
    return boards


def write_boards_jsonl(path: str | os.PathLike, boards: list[Board]) -> Path:
    """Write boards as JSONL {"puzzle","solution"}, atomically."""
    lines = [json.dumps({"puzzle": b.puzzle, "solution": b.solution}) for b in boards]
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


def _csv_columns(path: Path, header: list[str] | None) -> tuple[int, int]:
    names = [h.strip().lower() for h in header or []]
    for puzzle_name, solution_name in CSV_COLUMNS:
        if puzzle_name in names and solution_name in names:
            return names.index(puzzle_name), names.index(solution_name)
    got = ",".join(header) if header else "an empty file"
    raise InputError(
        f"{path}:1: header is {got!r}, expected columns `quizzes,solutions` "
        f"(fix: make the first line `quizzes,solutions`, as in the Kaggle sudoku dataset)"
    )


def _validated(where: str, puzzle: str, solution: str, size: int | None) -> Board:
    try:
        return validate_board(puzzle, solution, size)
    except BoardError as e:
        raise InputError(f"{where}: {e}") from None


# --------------------------------------------------------------------------------------------- chat


@dataclass(frozen=True)
class ChatRecord:
    """One single-turn SFT row: the prompt turns (everything before the final assistant turn), the final assistant
    message (content plus any tool_calls / reasoning_content) and its text."""

    prompt_messages: list[dict[str, Any]]
    completion: str
    where: str  # "path:LINE", for errors raised later (e.g. a prompt too long once tokenised)
    response_message: dict[str, Any] | None = None  # None = {"role": "assistant", "content": completion}

    @property
    def response(self) -> dict[str, Any]:
        return self.response_message or {"role": "assistant", "content": self.completion}


def read_chat_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[ChatRecord]:
    """Chat SFT rows: {"prompt","completion"} (the prompt becomes one user turn) or {"messages": [...]}."""
    records: list[ChatRecord] = []
    for where, obj in _jsonl_objects(path):
        if limit is not None and len(records) >= limit:
            break
        if "messages" in obj:
            records.append(_from_messages(where, obj["messages"]))
        elif "prompt" in obj or "completion" in obj:
            records.append(_from_prompt_completion(where, obj))
        else:
            raise InputError(
                f"{where}: missing key: expected {{'prompt', 'completion'}} or {{'messages'}}, got {sorted(obj)} "
                '(fix: write {"prompt": "...", "completion": "..."} or {"messages": [{"role": ..., "content": ...}]})'
            )
    return records


def _from_prompt_completion(where: str, obj: dict[str, Any]) -> ChatRecord:
    for key in ("prompt", "completion"):
        if key not in obj:
            raise InputError(f"{where}: missing key {key!r} (fix: each line needs both \"prompt\" and \"completion\")")
        if not isinstance(obj[key], str):
            raise InputError(f"{where}: {key!r} is a {type(obj[key]).__name__}, not a string (fix: make it a string)")
    if not obj["prompt"].strip():
        raise InputError(f"{where}: empty prompt (fix: give every row a non-empty \"prompt\")")
    if not obj["completion"].strip():
        raise InputError(f"{where}: empty completion (fix: give every row a non-empty \"completion\", or drop it)")
    return ChatRecord([{"role": "user", "content": obj["prompt"]}], obj["completion"], where)


_MESSAGES_FIX = (
    '(fix: "messages" is a list of {"role": "system"|"developer"|"user"|"assistant"|"tool", "content": "<text>" or '
    '[{"type": "text", "text": "<text>"}, ...]} ending with the assistant)'
)


def _text_content(where: str, i: int, content: Any, may_be_empty: bool) -> str:
    """A message's content as text: a string as is, OpenAI content parts joined (text parts only)."""
    if content is None and may_be_empty:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InputError(f"{where}: message {i} content is a {type(content).__name__}, not a string or a list of "
                         f"content parts {_MESSAGES_FIX}")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise InputError(
                f"{where}: message {i} content part {j} is of type {kind!r}; only text parts "
                '({"type": "text", "text": "..."}) are supported, this pipeline trains a text model '
                "(fix: drop the part or describe it in text)"
            )
        texts.append(part["text"])
    return "".join(texts)  # parts are consecutive pieces of one message, as chat templates write them


def _from_messages(where: str, messages: Any) -> ChatRecord:
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: \"messages\" must be a non-empty list {_MESSAGES_FIX}")
    normalised = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise InputError(f"{where}: message {i} needs \"role\" and \"content\" {_MESSAGES_FIX}")
        if message["role"] not in CHAT_ROLES:
            raise InputError(f"{where}: message {i} has role {message['role']!r}; expected one of {CHAT_ROLES} "
                             f"{_MESSAGES_FIX}")
        calls = message.get("tool_calls")
        if calls is not None and (message["role"] != "assistant" or not isinstance(calls, list)):
            raise InputError(f"{where}: message {i} has \"tool_calls\" {'' if isinstance(calls, list) else 'that is not a list '}"
                             f"on a {message['role']!r} message (fix: tool_calls is a list on assistant messages)")
        reasoning = message.get("reasoning_content")
        if reasoning is not None and (message["role"] != "assistant" or not isinstance(reasoning, str)):
            raise InputError(f"{where}: message {i} has \"reasoning_content\" on a {message['role']!r} message or "
                             "not as a string (fix: reasoning_content is the assistant's reasoning text)")
        content = _text_content(where, i, message["content"], may_be_empty=bool(calls))
        extras = {k: message[k] for k in CHAT_EXTRA_KEYS if message.get(k) is not None}
        normalised.append({"role": message["role"], "content": content, **extras})
    final = normalised[-1]
    if final["role"] != "assistant":
        raise InputError(
            f"{where}: the last message is from {final['role']!r}, not the assistant "
            "(fix: end each conversation with the assistant turn to supervise; single-turn SFT)"
        )
    if len(normalised) < 2:
        raise InputError(
            f"{where}: no prompt: the assistant turn is the only message (fix: add the user turn before it)"
        )
    if not final["content"].strip() and not final.get("tool_calls"):
        raise InputError(
            f"{where}: empty completion: the final assistant message is empty (fix: fill it or drop the row)"
        )
    return ChatRecord(normalised[:-1], final["content"], where, response_message=final)


# --------------------------------------------------------------------------------------------- shared


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: file not found (fix: check the path in data.train_path / data.eval_path)")
    return path


def _looks_like_jsonl(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return True
    if suffix == ".csv":
        return False
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if line.strip():
                return line.lstrip().startswith("{")
    return False


def _jsonl_objects(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, object) for each non-blank line; invalid JSON or a non-object is an error naming the line."""
    path = _existing(path)
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(
                    f"{where}: invalid JSON at column {e.colno}: {e.msg} (fix: one JSON object per line)"
                ) from None
            if not isinstance(obj, dict):
                kind = type(obj).__name__
                raise InputError(f"{where}: expected a JSON object, got {kind} (fix: one object per line)")
            yield where, obj
