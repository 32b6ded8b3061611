"""Objectives: corruption (uniform, mask), the decoder's training attention masks, and the losses.

`build_objective(objective_settings, tokenizer)` -> an object with `loss(model, batch, generator) -> LossOutput`.
"""

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
    "UniformObjective",
    "build_objective",
    "fill_token_id",
]
