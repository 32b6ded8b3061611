"""Training callbacks: training throughput in tokens per wall second, and the progress bar choice."""

from __future__ import annotations

import time

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

from dg_pipeline.core.errors import InputError


class TokensPerSecond(Callback):
    """Logs train/tokens_per_sec: the batch's tokens (attention_mask, all ranks) per wall second of training.

    The clock runs from one training batch's end to the next, so data loading and the optimiser step count and
    validation does not. `overall()` is the whole run's figure (total tokens / total training seconds).
    """

    def __init__(self):
        self.total_tokens = 0
        self.total_seconds = 0.0
        self._last: float | None = None

    def _restart_clock(self, *_args, **_kwargs) -> None:
        self._last = time.perf_counter()

    on_train_start = _restart_clock
    on_validation_end = _restart_clock

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self._last is None:
            self._last = now
            return
        seconds, self._last = now - self._last, now
        tokens = int(batch["attention_mask"].sum()) * trainer.world_size
        self.total_tokens += tokens
        self.total_seconds += seconds
        pl_module.log("train/tokens_per_sec", tokens / max(seconds, 1e-9), prog_bar=True, batch_size=1)

    def overall(self) -> float:
        return self.total_tokens / self.total_seconds if self.total_seconds > 0 else 0.0


def progress_bar(kind: str) -> list[Callback]:
    """trainer.progress_bar: tqdm | none. (Lightning 2.4's RichProgressBar fails on the installed rich 14:
    `clear_live` pops an empty stack on train start, so it is not offered.)"""
    if kind == "tqdm":
        return [TQDMProgressBar()]
    if kind == "none":
        return []
    raise InputError(f"trainer.progress_bar={kind}: choose tqdm or none")
