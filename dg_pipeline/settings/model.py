"""The `model` config group: where the base weights come from and the block (canvas) length."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dg_pipeline.settings.checks import check_choice, check_positive_int

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelSettings:
    """conf/model/*.yaml (sudoku4.yaml documents every key)."""

    base: Optional[str] = None  # a local HF dir (DiffusionGemma or Gemma 4); wins over `init`
    init: Optional[str] = None  # a named shape of dg_pipeline.model.configs, randomly initialised
    canvas_length: Optional[int] = None
    dtype: str = "float32"
    vocab_size: Optional[int] = None

    def __post_init__(self) -> None:
        check_positive_int("model.canvas_length", self.canvas_length, "a positive integer (the block length)",
                           optional=True)
        check_choice("model.dtype", self.dtype, DTYPES)
        check_positive_int("model.vocab_size", self.vocab_size, optional=True)
