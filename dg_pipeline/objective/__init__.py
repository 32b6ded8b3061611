"""Objectives: corruption (uniform, mask), the decoder's training attention masks, and the losses.

`build_objective(objective_settings, tokenizer)` -> an object with `loss(model, batch, noise) -> LossOutput`; the
noise of each example is keyed by (seed, stream, epoch, example index) (`NoiseKey`). `ObjectiveForward(model,
objective)` runs it as one module call (the root of a sharded model).
"""

from dg_pipeline.objective.corruption import TRAIN_STREAM, VALIDATION_STREAM, NoiseKey
from dg_pipeline.objective.forward import ObjectiveForward
from dg_pipeline.objective.losses import (
    BlockDiffusionObjective,
    EncoderARObjective,
    LossOutput,
    MaskedObjective,
    UniformObjective,
    build_objective,
    fill_token_id,
)

__all__ = [
    "BlockDiffusionObjective",
    "EncoderARObjective",
    "LossOutput",
    "MaskedObjective",
    "NoiseKey",
    "ObjectiveForward",
    "TRAIN_STREAM",
    "VALIDATION_STREAM",
    "UniformObjective",
    "build_objective",
    "fill_token_id",
]
