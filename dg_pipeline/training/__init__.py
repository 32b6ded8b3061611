"""Training: the LightningModule, the Trainer wired through NeMo's exp_manager (W&B, checkpoints, resume, EMA),
LoRA shared by the encoder and decoder, and `train(...)`, the one call a training stage makes."""

from dg_pipeline.training.lora import apply_lora, merge_lora
from dg_pipeline.training.module import BlockDiffusionModule, OptimConfig, freeze_router
from dg_pipeline.training.trainer import (
    RESUME_KEYS,
    TrainingJob,
    TrainingResult,
    build_trainer,
    fit,
    make_loaders,
    train,
)

__all__ = [
    "BlockDiffusionModule",
    "OptimConfig",
    "RESUME_KEYS",
    "TrainingJob",
    "TrainingResult",
    "apply_lora",
    "build_trainer",
    "fit",
    "freeze_router",
    "make_loaders",
    "merge_lora",
    "train",
]
