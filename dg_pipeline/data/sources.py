"""Where a stage's examples come from: `load_splits(data, tokenizer, run_dir, seed) -> Splits(train, val, eval)`
(`data`: the run's DataSettings), and `load_eval_examples` for a gate that only needs the eval set.

- kind=sudoku, no paths: generate n_eval + n_val + n_train boards with distinct puzzles into <run_dir>/data/
  (eval.jsonl, val.jsonl, train.jsonl and params.json); a later call with the same parameters reuses the files.
  The eval boards are the first of the seeded stream, so they stay the same when only n_train changes.
- kind=sudoku with data.train_path and/or data.eval_path (Kaggle CSV or JSONL): read them; a missing eval file is
  split off the training file (val always is), a missing training file is generated without the eval puzzles.
- kind=chat: data.train_path (required) and data.eval_path (optional, else split off the training file).
Val and eval never share a prompt (Sudoku: a puzzle) with train: duplicates are dropped from train.

kind=sudoku also builds `Splits.independent`: data.independent.n_eval boards of the independent generator
(`independent.py`, a different procedure and RNG stream), evaluated next to `eval` (`Splits.gate_examples`) and
never trained on. The training side gets only the set of its puzzles, to avoid them (`avoid=`); every gate example
carries meta["eval_source"] (`pipeline` / `file` / `independent`), so the gate reports each source apart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from transformers import PreTrainedTokenizerBase

from dg_pipeline.core.errors import InputError
from dg_pipeline.core.io import atomic_write_json, read_json
from dg_pipeline.core.rundir import RunDir
from dg_pipeline.data.examples import BoardCodec, Example, chat_examples, sudoku_example, sudoku_examples
from dg_pipeline.data.independent import INDEPENDENT_VERSION, SOURCE_NAME, independent_boards
from dg_pipeline.data.readers import ChatRecord, read_boards, read_boards_jsonl, read_chat_jsonl, write_boards_jsonl
from dg_pipeline.settings.data import DataSettings
from dg_pipeline.data.sudoku import (
    GENERATOR_VERSION,
    Board,
    check_clue_range,
    check_clue_weights,
    generate_boards,
    geometry,
    size_for_length,
)

log = logging.getLogger(__name__)
SPLIT_FILES = {"train": "train.jsonl", "val": "val.jsonl", "eval": "eval.jsonl"}
PARAMS_FILE = "params.json"

T = TypeVar("T")


# meta["eval_source"] of the eval split: boards of the training generator's stream, or rows of a file.
PIPELINE_SOURCE, FILE_SOURCE = "pipeline", "file"


@dataclass
class Splits:
    train: list[Example]
    val: list[Example]
    eval: list[Example]
    # Held-out boards of the independent generator (kind=sudoku): evaluated, never trained on.
    independent: list[Example] = field(default_factory=list)

    def gate_examples(self) -> list[Example]:
        """What a gate scores: the eval split, then the independent set."""
        return [*self.eval, *self.independent]


def load_splits(
    data: DataSettings, tokenizer: PreTrainedTokenizerBase, run_dir: RunDir | str | os.PathLike, seed: int,
    eos_token_ids: Sequence[int] | None = None,
) -> Splits:
    """Train/val/eval Examples of the `data` group. `eos_token_ids`: the model's stop ids (where a chat turn's
    supervision ends; None = the tokenizer's eos)."""
    data_dir = (run_dir if isinstance(run_dir, RunDir) else RunDir(Path(run_dir))).data_dir()
    if data.kind == "sudoku":
        return _sudoku_splits(data, tokenizer, data_dir, seed)
    return _chat_splits(data, tokenizer, seed, eos_token_ids)


def load_eval_examples(data: DataSettings, tokenizer: PreTrainedTokenizerBase, run_dir: RunDir, seed: int,
                       limit: int | None = None, eos_token_ids: Sequence[int] | None = None) -> list[Example]:
    """The examples a gate scores: data.eval_path read directly (its first `limit` rows; no training data is
    touched), else the run's eval split; Sudoku adds the independent held-out boards."""
    if not data.eval_path:
        return load_splits(data, tokenizer, run_dir, seed, eos_token_ids).gate_examples()
    if data.kind == "sudoku":
        boards = _eval_rows(read_boards(data.eval_path, data.size, limit=limit), data.eval_path)
        size = data.size or (size_for_length(len(boards[0].puzzle)) if boards else None)
        return sudoku_examples(boards, tokenizer, FILE_SOURCE) + independent_examples(data, tokenizer, size, len(boards))
    records = _eval_rows(read_chat_jsonl(data.eval_path, limit=limit), data.eval_path)
    return chat_examples(records, tokenizer, data.max_prompt_length, data.chat_template, eos_token_ids)


# --------------------------------------------------------------------------------------------- sudoku


def _sudoku_splits(data: DataSettings, tokenizer: PreTrainedTokenizerBase, data_dir: Path, seed: int) -> Splits:
    codec = BoardCodec(tokenizer)
    size, train_path, eval_path = data.size, data.train_path, data.eval_path
    n_train, n_val, n_eval = data.n_train, data.n_val or 0, data.n_eval

    # An eval file gives its first n_eval rows (null = all).
    eval_boards = _eval_rows(read_boards(eval_path, size, limit=n_eval), eval_path) if eval_path else None
    if eval_boards:
        size = size or size_for_length(len(eval_boards[0].puzzle))
    if train_path:
        train_boards = read_boards(train_path, size, limit=_rows_needed(n_train, n_val, n_eval, eval_path))
        if train_boards:
            size = size or size_for_length(len(train_boards[0].puzzle))
            _check_prompt_length(data, codec, size)
        eval_boards, val_boards, train_boards = split_disjoint(
            train_boards, n_eval or 0, n_val, n_train, seed, _puzzle, held_out=eval_boards
        )
        independent = independent_set(data, size, len(eval_boards))
        avoid = {b.puzzle for b in independent}
        val_boards, train_boards = _avoiding(val_boards, avoid), _avoiding(train_boards, avoid)
    else:
        if size is None:
            raise InputError("data.size is required to generate Sudoku boards (fix: data.size=4 or data.size=9)")
        geometry(size)  # names data.size when it is not 4 or 9
        _check_prompt_length(data, codec, size)
        independent = independent_set(data, size, len(eval_boards) if eval_boards is not None else n_eval or 0)
        eval_boards, val_boards, train_boards = _generated_splits(
            data, size, n_train, n_val, n_eval or 0, eval_boards, data_dir, seed, avoid=[b.puzzle for b in independent]
        )
    eval_source = FILE_SOURCE if train_path or eval_path else PIPELINE_SOURCE
    splits = Splits(
        [sudoku_example(b, codec) for b in train_boards],
        [sudoku_example(b, codec) for b in val_boards],
        [sudoku_example(b, codec, eval_source=eval_source) for b in eval_boards],
        [sudoku_example(b, codec, eval_source=SOURCE_NAME) for b in independent],
    )
    _check_not_empty(splits, train_path or "the generated data")
    return splits


def independent_settings(data: DataSettings, eval_size: int) -> dict[str, Any]:
    """data.independent with its nulls resolved: n_eval -> `eval_size` (as many boards as the eval split), the
    clue range -> data.min_clues..data.max_clues."""
    ind = data.independent
    return {
        "version": INDEPENDENT_VERSION,
        "n_eval": eval_size if ind.n_eval is None else ind.n_eval,
        "seed": ind.seed,
        "min_clues": ind.min_clues if ind.min_clues is not None else data.min_clues,
        "max_clues": ind.max_clues if ind.max_clues is not None else data.max_clues,
    }


def independent_set(data: DataSettings, size: int | None, eval_size: int) -> list[Board]:
    """The independent generator's held-out boards for data.independent (none when n_eval is 0 or there is
    no board size); `eval_size`: the eval split's size (n_eval null = as many)."""
    if size is None or data.kind != "sudoku":
        return []
    s = independent_settings(data, eval_size)
    if not s["n_eval"]:
        return []
    return independent_boards(size, s["n_eval"], s["min_clues"], s["max_clues"], s["seed"])


def independent_examples(
    data: DataSettings, tokenizer: PreTrainedTokenizerBase, size: int | None, eval_size: int
) -> list[Example]:
    """independent_set as gate Examples (meta eval_source = "independent")."""
    return sudoku_examples(independent_set(data, size, eval_size), tokenizer, SOURCE_NAME)


def _avoiding(boards: list[Board], puzzles: set[str]) -> list[Board]:
    return [b for b in boards if b.puzzle not in puzzles] if puzzles else boards


def _rows_needed(n_train: int | None, n_val: int, n_eval: int | None, eval_path: Any) -> int | None:
    """Rows to read from a training file (in file order): all of them unless every split has a count."""
    if n_train is None:
        return None
    if eval_path:
        return n_train + n_val
    return None if n_eval is None else n_train + n_val + n_eval


def _generated_splits(
    data: DataSettings,
    size: int,
    n_train: int | None,
    n_val: int,
    n_eval: int,
    eval_boards: list[Board] | None,
    data_dir: Path,
    seed: int,
    avoid: Sequence[str] = (),
) -> tuple[list[Board], list[Board], list[Board]]:
    """(eval, val, train) boards generated into data_dir, or reused from it when the parameters match.

    With `eval_boards` (from data.eval_path) only val and train are generated, avoiding those puzzles. `avoid`:
    puzzles no generated board may be (the independent held-out set's); only these strings reach this code."""
    if n_train is None:
        raise InputError("data.n_train is required to generate Sudoku boards (fix: e.g. data.n_train=20000)")
    min_clues, max_clues, workers = data.min_clues, data.max_clues, data.workers
    check_clue_range(size, min_clues, max_clues)
    clue_weights = list(data.clue_weights) if data.clue_weights is not None else None
    check_clue_weights(min_clues, max_clues, clue_weights)
    held_out = [b.puzzle for b in eval_boards] if eval_boards is not None else None
    params = {
        "generator_version": GENERATOR_VERSION,
        "size": size,
        "min_clues": min_clues,
        "max_clues": max_clues,
        "clue_weights": clue_weights,
        "seed": seed,
        "n_train": n_train,
        "n_val": n_val,
        "n_eval": None if held_out is not None else n_eval,
        # Generated boards avoid the puzzles of data.eval_path; a different eval file means different boards.
        "held_out_sha256": _digest(held_out) if held_out is not None else None,
        "avoid_sha256": _digest(list(avoid)) if avoid else None,
    }
    names = ["val", "train"] if held_out is not None else ["eval", "val", "train"]
    counts = {"eval": n_eval, "val": n_val, "train": n_train}
    files = {name: data_dir / SPLIT_FILES[name] for name in names}
    loaded = None
    if _reusable(data_dir / PARAMS_FILE, params, files.values()):
        loaded = {name: read_boards_jsonl(path, size) for name, path in files.items()}
        if any(len(loaded[name]) != counts[name] for name in names):
            loaded = None  # a file edited since: regenerate
        else:
            log.info("reusing generated Sudoku boards in %s", data_dir)
    if loaded is None:
        # Until params.json is rewritten, the files on disk belong to no parameter set.
        (data_dir / PARAMS_FILE).unlink(missing_ok=True)
        boards = generate_boards(
            size, sum(counts[n] for n in names), min_clues, max_clues, seed,
            workers=workers, exclude=[*(held_out or ()), *avoid], progress=True, clue_weights=clue_weights,
        )
        loaded, start = {}, 0
        for name in names:
            loaded[name] = boards[start : start + counts[name]]
            start += counts[name]
            write_boards_jsonl(files[name], loaded[name])
        atomic_write_json(data_dir / PARAMS_FILE, params)  # last: its presence marks the set complete
        log.info("generated %d Sudoku boards into %s", len(boards), data_dir)
    return (eval_boards if held_out is not None else loaded["eval"]), loaded["val"], loaded["train"]


def _reusable(params_path: Path, params: dict, files) -> bool:
    if not params_path.is_file() or not all(f.is_file() for f in files):
        return False
    try:
        return read_json(params_path) == params
    except InputError:
        return False  # a damaged params file: regenerate


def _check_prompt_length(data: DataSettings, codec: BoardCodec, size: int) -> None:
    limit = data.max_prompt_length
    needed = codec.prompt_length(size)
    if limit is not None and needed > limit:
        raise InputError(
            f"data.max_prompt_length={limit}: a {size}x{size} prompt is {needed} tokens (<bos> + {size * size} "
            f"cells + <sep>) (fix: data.max_prompt_length>={needed})"
        )


def _puzzle(board: Board) -> str:
    return board.puzzle


def _digest(puzzles: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(puzzles)).encode()).hexdigest()


# --------------------------------------------------------------------------------------------- chat


def _chat_splits(data: DataSettings, tokenizer: PreTrainedTokenizerBase, seed: int,
                 eos_token_ids: Sequence[int] | None) -> Splits:
    train_path, eval_path = data.train_path, data.eval_path
    if not train_path:
        raise InputError(
            "data.train_path is required for recipe=chat (data.kind=chat): a JSONL file of "
            '{"prompt","completion"} or {"messages": [...]} rows (fix: add data.train_path=/path/to/train.jsonl)'
        )
    n_train, n_val, n_eval = data.n_train, data.n_val or 0, data.n_eval
    held_out = _eval_rows(read_chat_jsonl(eval_path, limit=n_eval), eval_path) if eval_path else None
    records = read_chat_jsonl(train_path, limit=_rows_needed(n_train, n_val, n_eval, eval_path))
    eval_records, val_records, train_records = split_disjoint(
        records, n_eval or 0, n_val, n_train, seed, _prompt_key, held_out=held_out
    )
    splits = Splits(
        *(
            chat_examples(records, tokenizer, data.max_prompt_length, data.chat_template, eos_token_ids)
            for records in (train_records, val_records, eval_records)
        )
    )
    _check_not_empty(splits, train_path)
    return splits


def _prompt_key(record: ChatRecord) -> str:
    return json.dumps(record.prompt_messages, sort_keys=True)


# --------------------------------------------------------------------------------------------- shared


def split_disjoint(
    items: Sequence[T],
    n_eval: int,
    n_val: int,
    n_train: int | None,
    seed: int,
    key: Callable[[T], str],
    held_out: Sequence[T] | None = None,
) -> tuple[list[T], list[T], list[T]]:
    """(eval, val, train) with no key in two splits: dedupe `items` by key (first kept), drop `held_out` keys,
    shuffle with `seed`, then eval (unless `held_out` is the eval set), val, and up to n_train (None = all) train."""
    held_keys = {key(x) for x in held_out} if held_out is not None else set()
    seen, unique = set(held_keys), []
    for item in items:
        k = key(item)
        if k not in seen:
            seen.add(k)
            unique.append(item)
    random.Random(seed).shuffle(unique)
    if held_out is not None:
        eval_items, rest = list(held_out), unique
    else:
        eval_items, rest = unique[:n_eval], unique[n_eval:]
    val_items, train_items = rest[:n_val], rest[n_val:]
    if n_train is not None:
        train_items = train_items[:n_train]
    dropped = len(items) - len(unique)
    if dropped:
        log.info("dropped %d rows whose prompt repeats an earlier row or an eval row", dropped)
    return eval_items, val_items, train_items


def _eval_rows(rows: list, path: Any) -> list:
    """The rows of data.eval_path; none is an error before any training or decoding (a gate needs examples)."""
    if not rows:
        raise InputError(f"data.eval_path={path}: the file holds no examples, so no gate could score this run (fix: "
                         "point data.eval_path at a non-empty file, or drop it to use the run's generated eval split)")
    return rows


def _check_not_empty(splits: Splits, source: Any) -> None:
    if not splits.train:
        raise InputError(
            f"{source}: no training rows left after taking {len(splits.eval)} eval and {len(splits.val)} val rows "
            "(fix: lower data.n_eval / data.n_val, or give more rows)"
        )
