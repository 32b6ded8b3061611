"""The `export` config group: the release bundle vLLM serves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dg_pipeline.settings.checks import check_choice, check_number
from dg_pipeline.settings.model import DTYPES

EXPORT_FORMATS = ("hf", "bf16")


@dataclass
class ExportSettings:
    """conf/export/*.yaml (hf.yaml documents every key)."""

    format: str = "hf"
    name: Optional[str] = None  # null = the quantize input's dir name (hf), "bf16" (bf16)
    overwrite: bool = False
    skip_hashes: bool = False  # stage=check: accept a bundle without manifest.json, skip the sha256 comparison
    dtype: str = "bfloat16"
    max_accuracy_drop: Optional[float] = 0.03  # the reload gate's allowance when verify.max_accuracy_drop is null

    def __post_init__(self) -> None:
        check_choice("export.format", self.format, EXPORT_FORMATS,
                     " (hf: ModelOpt unified checkpoint of a quantize output; bf16: plain HF weights of an "
                     "unquantized model)")
        check_choice("export.dtype", self.dtype, DTYPES)
        check_number("export.max_accuracy_drop", self.max_accuracy_drop, low=0.0, optional=True)
