"""The LightningModule: a DiffusionGemmaForBlockDiffusion trained with one objective (dg_pipeline.objective).

Every forward of a step is one call of `self.network` (an ObjectiveForward holding the model), the root FSDP unit
when the model is sharded (`configure_model`, dg_pipeline.training.sharding). The noise of each example is keyed by
(seed, epoch, example index), so it does not depend on the number of ranks and a resumed run continues it.

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
from dg_pipeline.objective import TRAIN_STREAM, VALIDATION_STREAM, NoiseKey, ObjectiveForward
from dg_pipeline.settings import ParallelSettings
from dg_pipeline.training.sharding import is_sharded, shard_network

# Validation noise levels for the single-step accuracy metrics.
VALIDATION_LEVELS = (1.0, 0.5)


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
    with `objective.loss(model, batch, noise)`.

    parallel: the scale-out settings; under trainer.strategy=fsdp `configure_model` shards the model.
    weights_dir: for a model built on the meta device (sharded runs), the dir its weights are loaded from, each
    rank reading only its shards, right after sharding.
    """

    def __init__(self, model, objective, optim: OptimConfig, seed: int = 0,
                 parallel: ParallelSettings | None = None, weights_dir=None):
        super().__init__()
        self.network = ObjectiveForward(model, objective)
        self.optim = optim
        self.seed = int(seed)
        self.parallel = parallel or ParallelSettings()
        self.weights_dir = weights_dir
        self.last_validated_step: int | None = None  # global step of the latest full validation
        self.resumed_train_loss: float | None = None  # the train loss logged before the checkpoint resumed from
        # DDP (when it wraps the module) and Lightning (before a validate outside fit) broadcast rank 0's buffers to
        # the other ranks by position. The rotary module registers its per-layer-type buffers in `set` order, which
        # differs between processes (string hashing): rank 1's sliding and full-attention frequencies would be
        # swapped. They are constants computed alike on every rank, so no sync may touch them (torch's DDP ignore
        # list, which Lightning's sync reads too).
        self._ddp_params_and_buffers_to_ignore = [name for name, _ in self.named_buffers()]

    @property
    def model(self):
        return self.network.model

    @property
    def objective(self):
        return self.network.objective

    # -- noise streams: each example's noise from (seed, stream, epoch, example index)
    @property
    def train_noise(self) -> NoiseKey:
        return NoiseKey(self.seed, TRAIN_STREAM)

    @property
    def validation_noise(self) -> NoiseKey:
        """Validation draws the same noise every time, so val metrics compare across steps."""
        return NoiseKey(self.seed, VALIDATION_STREAM)

    # -- steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.network.loss(batch, self.train_noise)
        n = batch_size_of(batch)
        # Averaged over ranks: the logged (and recorded) train loss is the global batch's, not rank 0's.
        self.log("train/loss", out.loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log("train/diffusion_loss", out.diffusion_loss, batch_size=n, sync_dist=True)
        self.log("train/ar_loss", out.ar_loss, batch_size=n, sync_dist=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=n)
        self.last_loss = out.loss.detach()  # for StopOnNonFinite, which sees the gradients before the step
        return out.loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.network.loss(batch, self.validation_noise)
        n = batch_size_of(batch)
        self.log("val/loss", out.loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log("val/diffusion_loss", out.diffusion_loss, batch_size=n, sync_dist=True)
        self.log("val/ar_loss", out.ar_loss, batch_size=n, sync_dist=True)
        if not self.objective.has_diffusion:
            return
        for t in VALIDATION_LEVELS:
            acc = self.network.denoising_accuracy(batch, t, self.validation_noise)
            # Weighted by token count, so the epoch value is sum(correct) / sum(total).
            self.log(f"val/acc_t{t}", acc.correct / max(acc.total, 1), batch_size=max(acc.total, 1), sync_dist=True)
            self.log(f"val/answer_acc_t{t}", acc.answer_correct / max(acc.answer_total, 1),
                     batch_size=max(acc.answer_total, 1), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.last_validated_step = self.global_step

    # A run resumed from its last checkpoint may have no step left to run: it still reports the last train loss.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        loss = self.trainer.callback_metrics.get("train/loss")
        checkpoint["dg_last_train_loss"] = None if loss is None else float(loss)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.resumed_train_loss = checkpoint.get("dg_last_train_loss")

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

    # -- scale-out: ModelParallelStrategy (trainer.strategy=fsdp) calls this on every fit/validate
    def configure_model(self) -> None:
        mesh = getattr(self, "device_mesh", None)
        if mesh is None or is_sharded(self.network):
            return
        from dg_pipeline.training.expert_parallel import expert_mesh

        data_parallel = mesh["data_parallel"]
        shard_network(self.network, self.model, data_parallel, self.parallel,
                      expert_mesh=expert_mesh(data_parallel, self.parallel.expert_parallel))
        if any(p.is_meta for p in self.model.parameters()):
            from dg_pipeline.model.sharded_io import load_sharded_weights

            if self.weights_dir is None:
                raise ValueError("a meta-device model needs weights_dir to load its shards from")
            load_sharded_weights(self.model, self.weights_dir, self.trainer.strategy.root_device)
