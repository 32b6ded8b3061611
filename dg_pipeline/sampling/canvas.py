"""The canvas: how a block starts, how its tokens are sampled each step, and how rejected positions are re-noised.

(When the random numbers are drawn is randomness.RandomStream's job.)
"""

from __future__ import annotations

from typing import Protocol

import torch


class CanvasNoise(Protocol):
    def initial(self, batch_size: int, length: int, generator, device) -> torch.Tensor: ...
    def fresh_tokens(self, batch_size: int, length: int, generator, device) -> torch.Tensor | None: ...
    def renoise(
        self, accepted_canvas: torch.Tensor, accepted: torch.Tensor, fresh: torch.Tensor | None
    ) -> torch.Tensor: ...


class UniformCanvas:
    """Uniform-state diffusion (DiffusionGemma): start from uniformly random tokens, re-noise rejected positions with
    fresh uniformly random tokens."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def initial(self, batch_size: int, length: int, generator, device) -> torch.Tensor:
        return torch.randint(0, self.vocab_size, (batch_size, length), generator=generator, device=device)

    def fresh_tokens(self, batch_size: int, length: int, generator, device) -> torch.Tensor:
        return torch.randint(0, self.vocab_size, (batch_size, length), generator=generator, device=device)

    def renoise(self, accepted_canvas: torch.Tensor, accepted: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        return torch.where(accepted, accepted_canvas, fresh)


class MaskCanvas:
    """Masked diffusion (MDLM/LLaDA): start from all <mask>, re-mask rejected positions. Draws no random tokens."""

    def __init__(self, mask_token_id: int):
        self.mask_token_id = mask_token_id

    def initial(self, batch_size: int, length: int, generator, device) -> torch.Tensor:
        return torch.full((batch_size, length), self.mask_token_id, dtype=torch.long, device=device)

    def fresh_tokens(self, batch_size: int, length: int, generator, device) -> None:
        return None

    def renoise(self, accepted_canvas: torch.Tensor, accepted: torch.Tensor, fresh: None) -> torch.Tensor:
        return accepted_canvas.masked_fill(~accepted, self.mask_token_id)


def sample_categorical(probs: torch.Tensor, exponential: torch.Tensor) -> torch.Tensor:
    """(..., V) probabilities and Exp(1) noise of the same shape -> (...) sampled ids.

    argmax(p / q) with q ~ Exp(1) is how torch.multinomial(p, 1) samples, so with the same noise the ids are identical;
    drawing the noise ourselves skips multinomial's validity checks (host syncs) and lets us sample a subset of rows.
    """
    return torch.argmax(probs / exponential, dim=-1)
