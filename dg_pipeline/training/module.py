"""The LightningModule: a DiffusionGemmaForBlockDiffusion trained with one objective (dg_pipeline.objective).

It owns the optimisation recipe (AdamW, linear warm-up then cosine to lr * min_lr_ratio) and the metrics:
train/loss, train/diffusion_loss, train/ar_loss, train/lr (tokens/s comes from callbacks.TokensPerSecond) and
val/loss, val/diffusion_loss, val/ar_loss, val/acc_t1.0, val/acc_t0.5 (argmax accuracy of ONE denoising step from
a canvas corrupted at t, on the supervised tokens of a random block; t=1 is inference's all-noise first step) and
val/answer_acc_t1.0, val/answer_acc_t0.5 (the same on the answer tokens only, without the supervised pad fill).
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from dg_pipeline.core.errors import InputError

# Validation noise levels for the single-step accuracy metrics.
VALIDATION_LEVELS = (1.0, 0.5)
# Offset between the training and validation noise streams (validation repeats the same noise every time).
VALIDATION_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class OptimConfig:
    """The optimisation keys of conf/trainer (documented there)."""

    lr: float
    max_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0

    @classmethod
    def from_trainer_cfg(cls, trainer_cfg, max_steps: int) -> "OptimConfig":
        betas = tuple(float(b) for b in trainer_cfg.betas)
        if len(betas) != 2:
            raise InputError(f"trainer.betas={list(betas)}: expected two numbers, e.g. [0.95, 0.99]")
        return cls(
            lr=float(trainer_cfg.lr),
            max_steps=int(max_steps),
            warmup_steps=int(trainer_cfg.warmup_steps),
            min_lr_ratio=float(trainer_cfg.min_lr_ratio),
            betas=betas,
            weight_decay=float(trainer_cfg.weight_decay),
        )


def freeze_router(model) -> int:
    """Freeze every MoE router parameter (shared by encoder and decoder); returns how many tensors were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        if ".router." in name:
            param.requires_grad_(False)
            frozen += 1
    return frozen


def freeze_vision(model) -> None:
    """Text-only training never feeds images: keep the vision tower out of the optimiser (and of DDP's
    unused-parameter check)."""
    encoder = model.model.encoder
    for module in (encoder.vision_tower, encoder.embed_vision):
        module.requires_grad_(False)


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices (incl. 3-D expert weights), none on norms and scales."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise InputError("no trainable parameters: check trainer.lora.target_modules / objective.freeze_router")
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


def batch_size_of(batch: dict) -> int:
    return int(batch["input_ids"].shape[0])


class BlockDiffusionModule(pl.LightningModule):
    """Lightning wrapper: `model` (a DiffusionGemmaForBlockDiffusion, possibly with LoRA adapters injected) trained
    with `objective.loss(model, batch, generator)`."""

    def __init__(self, model, objective, optim: OptimConfig, seed: int = 0):
        super().__init__()
        self.model = model
        self.objective = objective
        self.optim = optim
        self.seed = int(seed)
        self._train_generator: torch.Generator | None = None
        self.last_validated_step: int | None = None  # global step of the latest full validation

    # -- noise streams
    @property
    def train_generator(self) -> torch.Generator:
        """The training noise stream: one per rank, created on the module's device, saved in checkpoints."""
        if self._train_generator is None or self._train_generator.device != self.device:
            self._train_generator = torch.Generator(device=self.device).manual_seed(self.seed + self.global_rank)
        return self._train_generator

    def validation_generator(self, batch_idx: int) -> torch.Generator:
        """Validation draws the same noise every time, so val metrics compare across steps."""
        return torch.Generator(device=self.device).manual_seed(self.seed + VALIDATION_SEED_OFFSET + batch_idx)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["dg_train_generator"] = self.train_generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "dg_train_generator" in checkpoint:
            self.train_generator.set_state(checkpoint["dg_train_generator"].cpu())

    # -- steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.objective.loss(self.model, batch, self.train_generator)
        n = batch_size_of(batch)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=n)
        self.log("train/diffusion_loss", out.diffusion_loss, batch_size=n)
        self.log("train/ar_loss", out.ar_loss, batch_size=n)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=n)
        self.last_loss = out.loss.detach()  # for StopOnNonFinite, which sees the gradients before the step
        return out.loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        generator = self.validation_generator(batch_idx)
        out = self.objective.loss(self.model, batch, generator)
        n = batch_size_of(batch)
        self.log("val/loss", out.loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log("val/diffusion_loss", out.diffusion_loss, batch_size=n, sync_dist=True)
        self.log("val/ar_loss", out.ar_loss, batch_size=n, sync_dist=True)
        if not self.objective.has_diffusion:
            return
        for t in VALIDATION_LEVELS:
            acc = self.objective.denoising_accuracy(self.model, batch, t, generator)
            # Weighted by token count, so the epoch value is sum(correct) / sum(total).
            self.log(f"val/acc_t{t}", acc.correct / max(acc.total, 1), batch_size=max(acc.total, 1), sync_dist=True)
            self.log(f"val/answer_acc_t{t}", acc.answer_correct / max(acc.answer_total, 1),
                     batch_size=max(acc.answer_total, 1), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.last_validated_step = self.global_step

    # -- optimisation
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            parameter_groups(self.model, self.optim.weight_decay), lr=self.optim.lr, betas=self.optim.betas
        )
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer,
            num_warmup_steps=min(self.optim.warmup_steps, self.optim.max_steps),
            num_training_steps=self.optim.max_steps,
            min_lr_rate=self.optim.min_lr_ratio,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- scale-out: ModelParallelStrategy (trainer.strategy=fsdp) calls this to shard the model
    def configure_model(self) -> None:
        mesh = getattr(self, "device_mesh", None)
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        # One FSDP unit over the whole model: encoder and decoder layers share (tie) their weights, so they must
        # live in the same unit.
        fully_shard(self.model, mesh=mesh["data_parallel"])
