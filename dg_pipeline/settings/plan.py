"""The `plan` config group: what `stage=plan` (dg_pipeline.training.memory_plan) costs a training step against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dg_pipeline.settings.checks import check_number, check_positive_int


@dataclass
class PlanSettings:
    """conf/plan/default.yaml documents every key."""

    device_memory_gb: float = 80.0  # memory of one device (GB, 1e9 bytes)
    prompt_length: Optional[int] = None  # tokens per example before the answer; None = from the data recipe
    response_length: Optional[int] = None  # answer tokens (through EOS) per example; None = from the data recipe

    def __post_init__(self) -> None:
        check_number("plan.device_memory_gb", self.device_memory_gb, low=0.0, low_inclusive=False)
        for key in ("prompt_length", "response_length"):
            check_positive_int(f"plan.{key}", getattr(self, key), "a positive number of tokens", optional=True)
