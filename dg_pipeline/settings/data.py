"""The `data` config group: which examples a run trains and is gated on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from dg_pipeline.core.errors import InputError
from dg_pipeline.settings.checks import check_non_negative_int, check_positive_int

DATA_KINDS = ("sudoku", "chat")


@dataclass
class IndependentSettings:
    """data.independent: held-out boards of the independent generator (conf/data/sudoku4.yaml documents the keys)."""

    n_eval: Optional[int] = None  # null = as many as the eval split; 0 = none
    seed: int = 20240613  # the held-out set's own seed: it never follows the global `seed`
    min_clues: Optional[int] = None  # null = data.min_clues
    max_clues: Optional[int] = None  # null = data.max_clues

    def __post_init__(self) -> None:
        check_non_negative_int("data.independent.n_eval", self.n_eval, optional=True)


@dataclass
class DataSettings:
    """conf/data/*.yaml (sudoku4.yaml and chat.yaml document every key)."""

    kind: str = "sudoku"
    size: Optional[int] = None  # Sudoku board size (4 or 9); null = taken from the files
    n_train: Optional[int] = None
    n_val: Optional[int] = 0
    n_eval: Optional[int] = None
    min_clues: Optional[int] = None
    max_clues: Optional[int] = None
    clue_weights: Optional[List[float]] = None  # generated boards: weight of each clue count min..max (null = uniform)
    train_path: Optional[str] = None
    eval_path: Optional[str] = None
    max_prompt_length: Optional[int] = None
    chat_template: bool = True  # chat: render prompts with the tokenizer's chat template
    workers: Optional[int] = None  # Sudoku generation processes (null = all cores)
    independent: IndependentSettings = field(default_factory=IndependentSettings)

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise InputError(f"data.kind={self.kind!r}: unknown data kind (fix: use one of {list(DATA_KINDS)})")
        for key in ("n_train", "n_val", "n_eval"):
            check_non_negative_int(f"data.{key}", getattr(self, key), optional=True)
        check_positive_int("data.max_prompt_length", self.max_prompt_length, optional=True)
        check_positive_int("data.workers", self.workers, "a positive number of processes", optional=True)
