"""Forward (noising) processes of the two objectives, and the per-example random choices a training step makes.

Every random choice of an example (its corruption level t, the block it is trained on, which positions are
corrupted, the noise tokens, whether it gets self-conditioning) is drawn from that example's OWN generator, seeded
from (seed, stream, epoch, example index) (`NoiseKey`). So the noise an example sees does not depend on which
rank or batch it lands in, on the batch size, or on how many steps ran before: 1 rank and 2 ranks at the same
global batch see the same noise, and a resumed run continues the same stream.

The draws are uniform numbers (`ExampleDraws`); the functions below turn them into the objective's choices and are
testable alone: t ~ U(t_eps, 1), a block uniform over the example's own blocks, the corruption itself (uniform
over the vocabulary for DiffusionGemma, a [MASK] token for MDLM/LLaDA), and who gets self-conditioning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dg_pipeline.core.seeds import derived_seed

# Independent noise streams of one seed: training steps and the validation metrics.
TRAIN_STREAM = 0
VALIDATION_STREAM = 1


@dataclass(frozen=True)
class NoiseKey:
    """Which noise a batch gets: the run's seed and the stream; each example adds its epoch and dataset index
    (batch["epoch"], batch["example_index"], set by the collator; absent = epoch 0, index = row)."""

    seed: int
    stream: int = TRAIN_STREAM

    def generators(self, batch: dict) -> list[torch.Generator]:
        rows = int(batch["input_ids"].shape[0])
        indices = batch.get("example_index")
        epochs = batch.get("epoch")
        indices = indices.tolist() if indices is not None else list(range(rows))
        epochs = epochs.tolist() if epochs is not None else [0] * rows
        return [torch.Generator().manual_seed(derived_seed(self.seed, self.stream, e, i))
                for e, i in zip(epochs, indices)]


@dataclass
class ExampleDraws:
    """The uniform draws of a batch, row b from example b's own generator (in this order): level (B,),
    block (B,), self_conditioning (B,), positions (B, C) and noise tokens (B, C) uniform over [0, vocab)."""

    level: torch.Tensor
    block: torch.Tensor
    self_conditioning: torch.Tensor
    positions: torch.Tensor
    tokens: torch.Tensor


def draw_example_noise(key: NoiseKey, batch: dict, canvas_length: int, vocab_size: int,
                       device: torch.device | str = "cpu") -> ExampleDraws:
    """Every random number a step needs for `batch`, drawn per example on the CPU (cheap: a few per example) and
    moved to `device`, so the values are the same on every device type."""
    level, block, sc, positions, tokens = [], [], [], [], []
    for g in key.generators(batch):
        level.append(torch.rand(1, generator=g))
        block.append(torch.rand(1, generator=g))
        sc.append(torch.rand(1, generator=g))
        positions.append(torch.rand(canvas_length, generator=g))
        tokens.append(torch.randint(0, vocab_size, (canvas_length,), generator=g))
    return ExampleDraws(
        level=torch.cat(level).to(device),
        block=torch.cat(block).to(device),
        self_conditioning=torch.cat(sc).to(device),
        positions=torch.stack(positions).to(device),
        tokens=torch.stack(tokens).to(device),
    )


def corruption_levels(u: torch.Tensor, t_eps: float) -> torch.Tensor:
    """One corruption level per example from its uniform draw: t ~ U(t_eps, 1), shape (B,), float32."""
    return t_eps + (1.0 - t_eps) * u


def choose_blocks(num_blocks: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One block index per example, uniform over that example's own response blocks: shape (B,), long."""
    # floor(u * n) is uniform on {0..n-1}; the clamp guards the u -> 1 float edge.
    return torch.minimum((u * num_blocks).long(), num_blocks.long() - 1)


def corrupted_positions(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Which positions of a (B, C) canvas get corrupted: each independently with its row's probability t."""
    return u < t[:, None]


def uniform_corrupt(clean: torch.Tensor, corrupted: torch.Tensor, noise_tokens: torch.Tensor) -> torch.Tensor:
    """Uniform-state noise (DiffusionGemma): a corrupted position becomes its noise token, drawn uniformly from the
    FULL vocabulary as inference's canvas initialisation `randint(0, vocab_size)` draws it (so it may by chance
    equal the clean token, probability 1/V)."""
    return torch.where(corrupted, noise_tokens, clean)


def mask_corrupt(clean: torch.Tensor, corrupted: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """Absorbing-state noise (MDLM/LLaDA): a corrupted position becomes the [MASK] token."""
    return torch.where(corrupted, torch.full_like(clean, mask_token_id), clean)


def self_conditioning_rows(u: torch.Tensor, probability: float) -> torch.Tensor:
    """Per-example bool: True where pass-1 logits feed pass 2 as self-conditioning (the HF decoder's
    `self_conditioning_mask`); False rows get a zero signal, exactly like the first step at inference."""
    return u < probability
