"""Checks on what a caller hands a sampler (prompt batch, attention mask, seed), each failure one clear InputError."""

from __future__ import annotations

import torch

from dg_pipeline.core.errors import InputError


def checked_prompt(
    prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) left-padded prompt ids and mask -> (long ids, bool mask) on `device`, or an InputError naming the row."""
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2 or 0 in prompt_ids.shape:
        shape = tuple(prompt_ids.shape) if isinstance(prompt_ids, torch.Tensor) else type(prompt_ids).__name__
        raise InputError(f"prompt_ids: expected a non-empty (batch, length) tensor of token ids, got {shape}")
    if attention_mask is None:
        attention_mask = torch.ones_like(prompt_ids, dtype=torch.bool)
    if attention_mask.shape != prompt_ids.shape:
        raise InputError(
            f"attention_mask: shape {tuple(attention_mask.shape)} differs from prompt_ids {tuple(prompt_ids.shape)}"
        )
    ids = prompt_ids.to(device=device, dtype=torch.long)
    mask = attention_mask.to(device=device).bool()
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise InputError(
            f"prompt_ids row {row}, column {col}: token id {int(ids[row, col])} is outside the vocabulary "
            f"[0, {vocab_size})"
        )
    empty_rows = ~mask.any(dim=1)
    if bool(empty_rows.any()):
        row = int(empty_rows.nonzero()[0])
        raise InputError(f"attention_mask row {row} is all padding; every prompt needs at least one token")
    # Left padding: once a row's real tokens start, no padding position follows.
    hole = mask.cummax(dim=1).values & ~mask
    if bool(hole.any()):
        row, col = (int(i) for i in hole.nonzero()[0])
        raise InputError(
            f"attention_mask row {row}: padding at column {col} follows a real token; prompts must be LEFT-padded "
            "(padding first, then the prompt)"
        )
    return ids, mask


def checked_max_new_tokens(max_new_tokens: int) -> int:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
    return max_new_tokens


def generator_for(seed: int | torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """An int seeds a fresh generator on `device`; a Generator is used as is; None draws from torch's global RNG."""
    if seed is None:
        return None
    if isinstance(seed, torch.Generator):
        if seed.device.type != device.type:
            raise InputError(f"seed: the torch.Generator is on {seed.device}, the model on {device}; create it there")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed={seed!r}: pass an int, a torch.Generator or None")
    return torch.Generator(device=device).manual_seed(seed)
