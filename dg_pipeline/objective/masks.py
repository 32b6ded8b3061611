"""The decoder's training-time view of the clean sequence: block geometry, positions and 4-D attention masks.

Training shows the decoder exactly what inference shows it. At inference the encoder cache ends at the block
boundary when a block is denoised: full-attention layers hold every clean position before it, sliding layers
(`DynamicSlidingWindowLayer`) hold only the last `sliding_window - 1` of them, and the decoder attends to all of
the cache it is given plus the whole canvas. In training the encoder cache holds the WHOLE clean sequence (every
layer keeps full K/V), so the masks below cut it back to that inference view, per row:

    cache key j (0 <= j < L):   visible iff  block_start - window <= j < block_start
                                (window = sliding_window - 1 on sliding layers, unbounded on full layers)
    canvas key (L <= j < L+C):  always visible (the canvas attends to all of itself)

so a canvas query never sees its own block's clean tokens nor later ones (the leakage rule), the sliding window
is anchored at the block boundary (the same window for every query of the block), and right padding beyond a
row's sequence is never visible (it lies at or after block_start).

The masks are materialised by transformers' own mask interface for the model's attention implementation (bool
for sdpa, additive float for eager, a BlockMask for flex), from one index-based mask function.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from dg_pipeline.core.errors import InputError

# Attention implementations that can take an arbitrary 4-D mask (flash kernels only know causal/padding).
MASKABLE_ATTENTION = ("sdpa", "eager", "flex_attention")


def block_starts(prompt_lengths: torch.Tensor, block_index: torch.Tensor, canvas_length: int) -> torch.Tensor:
    """Absolute position where block `block_index` of each row begins (collate's block layout)."""
    return prompt_lengths.long() + block_index.long() * canvas_length


def canvas_position_ids(starts: torch.Tensor, canvas_length: int) -> torch.Tensor:
    """Positions of the canvas: block_start + arange(C) per row, as the sampler numbers them. (B, C) long."""
    return starts[:, None] + torch.arange(canvas_length, device=starts.device)[None, :]


def gather_blocks(tokens: torch.Tensor, starts: torch.Tensor, canvas_length: int) -> torch.Tensor:
    """The C tokens of each row starting at its block start: (B, L) -> (B, C)."""
    index = canvas_position_ids(starts, canvas_length)
    if int(index.max()) >= tokens.shape[1]:
        raise ValueError(
            f"a block runs past the batch (needs {int(index.max()) + 1} positions, batch has {tokens.shape[1]}): "
            "the collator must pad each response to whole canvas blocks"
        )
    return torch.gather(tokens, 1, index)


def sliding_context_window(text_config) -> int:
    """How many clean positions before the block a sliding layer sees at inference: DynamicSlidingWindowLayer
    keeps the last `sliding_window - 1` tokens of the cache."""
    return int(text_config.sliding_window) - 1


def block_context_mask_function(starts: torch.Tensor, cache_length: int, window: int | None) -> Callable:
    """Index-based mask function (batch, head, q, kv) -> bool for keys [cache (L) ; canvas (C)]."""

    def visible(batch_idx, head_idx, q_idx, kv_idx):
        start = starts[batch_idx]
        in_canvas = kv_idx >= cache_length
        before_block = kv_idx < start
        if window is not None:
            before_block = before_block & (kv_idx >= start - window)
        return in_canvas | before_block

    return visible


def decoder_attention_masks(
    text_config,
    starts: torch.Tensor,
    cache_length: int,
    canvas_length: int,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """{"full_attention": mask, "sliding_attention": mask}, each (B, 1, C, L+C), for the decoder's layer types."""
    implementation = text_config._attn_implementation or "eager"
    if implementation not in MASKABLE_ATTENTION:
        raise InputError(
            f"model attention implementation {implementation!r} cannot take the block-diffusion training mask; "
            f"load the model with attn_implementation in {MASKABLE_ATTENTION} for training"
        )
    make_mask = ALL_MASK_ATTENTION_FUNCTIONS[implementation]
    masks = {}
    for layer_type in set(text_config.layer_types):
        window = sliding_context_window(text_config) if layer_type == "sliding_attention" else None
        masks[layer_type] = make_mask(
            batch_size=starts.shape[0],
            q_length=canvas_length,
            kv_length=cache_length + canvas_length,
            mask_function=block_context_mask_function(starts, cache_length, window),
            attention_mask=None,
            allow_is_causal_skip=False,
            allow_is_bidirectional_skip=False,
            dtype=dtype,
            device=starts.device,
        )
    return masks
