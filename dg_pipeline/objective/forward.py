"""The objective run as ONE call of a module that holds the model.

A training step calls the encoder, the decoder (twice with self-conditioning) and lm_head, not the model's own
forward. Wrappers that act on module calls must see all of it: FSDP2 gathers the root unit's parameters
(embeddings = lm_head, final norm, self-conditioning) in the root module's pre-forward hook, keeps them gathered
until the backward, and queues its end-of-backward work from hooks on the root's outputs. So the root of a sharded
model is this module, and every forward of a step enters through `ObjectiveForward.__call__` (the design NeMo
AutoModel's DiffusionGemma recipe uses: calls routed through the root module). Unsharded, it is the same
computation as `objective.loss(model, batch, noise)`.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from torch import nn

from dg_pipeline.objective.corruption import NoiseKey
from dg_pipeline.objective.losses import DenoisingAccuracy, LossOutput


class ObjectiveForward(nn.Module):
    """`module(batch, noise)` -> the objective's loss; `module(batch, noise, accuracy_at=t)` -> one-step denoising
    accuracy from level t (no gradients). Outputs are dicts of tensors (FSDP hooks the tensors of a pytree)."""

    def __init__(self, model: nn.Module, objective):
        super().__init__()
        self.model = model
        self.objective = objective  # not a module: it holds no parameters

    def forward(self, batch: dict, noise: NoiseKey, accuracy_at: float | None = None) -> dict:
        if accuracy_at is not None:
            acc = self.objective.denoising_accuracy(self.model, batch, accuracy_at, noise)
            return {f.name: getattr(acc, f.name) for f in fields(acc)}
        out = self.objective.loss(self.model, batch, noise)
        return {f.name: getattr(out, f.name) for f in fields(out)}

    def loss(self, batch: dict, noise: NoiseKey) -> LossOutput:
        return LossOutput(**self(batch, noise))

    @torch.no_grad()
    def denoising_accuracy(self, batch: dict, t: float, noise: NoiseKey) -> DenoisingAccuracy:
        return DenoisingAccuracy(**self(batch, noise, accuracy_at=t))
