"""Forward (noising) processes of the two objectives, and the per-example random choices a training step makes.

Every function takes an explicit `torch.Generator`, so a step's noise is reproducible from its seed, and each is
testable alone: the level t ~ U(t_eps, 1), the block each example is trained on, the corruption itself (uniform
over the vocabulary for DiffusionGemma, a [MASK] token for MDLM/LLaDA), and who gets self-conditioning.
"""

from __future__ import annotations

import torch


def sample_corruption_levels(
    batch_size: int, t_eps: float, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """One corruption level per example, t ~ U(t_eps, 1): shape (B,), float32."""
    u = torch.rand(batch_size, generator=generator, device=device)
    return t_eps + (1.0 - t_eps) * u


def choose_blocks(num_blocks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One block index per example, uniform over that example's own response blocks: shape (B,), long."""
    u = torch.rand(num_blocks.shape, generator=generator, device=num_blocks.device)
    # floor(u * n) is uniform on {0..n-1}; the clamp guards the u -> 1 float edge.
    return torch.minimum((u * num_blocks).long(), num_blocks.long() - 1)


def corruption_draws(clean: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Which positions of a (B, C) canvas get corrupted: each independently with its row's probability t."""
    u = torch.rand(clean.shape, generator=generator, device=clean.device)
    return u < t[:, None]


def uniform_corrupt(
    clean: torch.Tensor, t: torch.Tensor, vocab_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform-state noise (DiffusionGemma): with probability t a position becomes a token drawn uniformly from
    the FULL vocabulary, as inference's canvas initialisation `randint(0, vocab_size)` draws it.

    Returns (noised, corrupted); a corrupted draw may by chance equal the clean token (probability 1/V).
    """
    corrupted = corruption_draws(clean, t, generator)
    noise = torch.randint(0, vocab_size, clean.shape, generator=generator, device=clean.device)
    return torch.where(corrupted, noise, clean), corrupted


def mask_corrupt(
    clean: torch.Tensor, t: torch.Tensor, mask_token_id: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbing-state noise (MDLM/LLaDA): with probability t a position becomes the [MASK] token."""
    corrupted = corruption_draws(clean, t, generator)
    return torch.where(corrupted, torch.full_like(clean, mask_token_id), clean), corrupted


def sample_self_conditioning(
    batch_size: int, probability: float, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Per-example bool: True where pass-1 logits feed pass 2 as self-conditioning (the HF decoder's
    `self_conditioning_mask`); False rows get a zero signal, exactly like the first step at inference."""
    return torch.rand(batch_size, generator=generator, device=device) < probability
