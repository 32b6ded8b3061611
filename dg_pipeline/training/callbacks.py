"""Training callbacks: training throughput in tokens per wall second, the stop at a non-finite loss or gradient,
and the progress bar choice."""

from __future__ import annotations

import math
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

from dg_pipeline.core.errors import InputError, TrainingDiverged


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


NOTHING_SAVED = "Nothing of this run was saved (no model, no gate record; an earlier output is left as it was)."


class StopOnNonFinite(Callback):
    """Stops training at the first optimiser step whose loss or gradient norm is not finite, before that step
    changes the weights, with an error naming the step and the likely cause. The check is one reduction over every
    rank's gradients (a NaN on any rank or shard stops them all); the validation loss is checked too."""

    def __init__(self, stage: str, lr: float, precision: str):
        self.stage, self.lr, self.precision = stage, lr, str(precision)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        squares = torch.zeros((), dtype=torch.float64, device=pl_module.device)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # an FSDP shard
                    squares = squares + grad.detach().double().pow(2).sum()
        loss = getattr(pl_module, "last_loss", None)
        figures = torch.stack([squares, (loss if loss is not None else torch.zeros(())).double().to(squares.device)])
        figures = trainer.strategy.reduce(figures, reduce_op="sum")
        squares, loss_sum = (float(v) for v in figures)
        # Under fp16 a non-finite gradient is the loss scaler's business (it skips the step and lowers the scale).
        if math.isfinite(loss_sum) and (math.isfinite(squares) or self.precision.startswith("16")):
            return
        loss_value = float(loss) if loss is not None else float("nan")
        norm = math.sqrt(squares) if math.isfinite(squares) else squares
        raise TrainingDiverged(
            f"stage={self.stage}: training diverged at step {trainer.global_step + 1}: loss {loss_value:.4g}, "
            f"gradient norm {norm:.4g} (not finite). {self._likely_cause()} {NOTHING_SAVED}"
        )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get("val/loss")
        if value is not None and not math.isfinite(float(value)):
            raise TrainingDiverged(
                f"stage={self.stage}: the validation loss at step {trainer.global_step} is {float(value)}. "
                f"{self._likely_cause()} {NOTHING_SAVED}"
            )

    def _likely_cause(self) -> str:
        if self.precision.startswith("16"):
            return (f"Likely cause: fp16 overflow (trainer.precision={self.precision}); use "
                    f"trainer.precision=bf16-mixed or 32-true, or lower trainer.lr={self.lr:g}.")
        return (f"Likely cause: the learning rate trainer.lr={self.lr:g} is too large (the recipes use 5e-3 or less); "
                f"lower it, or check the data for empty or corrupt examples.")


def progress_bar(kind: str) -> list[Callback]:
    """trainer.progress_bar: tqdm | none. (Lightning 2.4's RichProgressBar fails on the installed rich 14:
    `clear_live` pops an empty stack on train start, so it is not offered.)"""
    if kind == "tqdm":
        return [TQDMProgressBar()]
    if kind == "none":
        return []
    raise InputError(f"trainer.progress_bar={kind}: choose tqdm or none")
