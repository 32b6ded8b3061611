"""The encoder KV cache a generation commits into, and what the decoder sees of it while denoising a block.

Both caches run the encoder (causal) over the prompt and then over each finished block, and hand the decoder a
`DecoderView` (cache, per-layer-type attention masks, canvas positions) built once per block:

- `DynamicBlockCache`: the reference's cache (HF DynamicCache; sliding layers keep their last window-1 tokens) and
  the reference's mask builders, so generation is bit-identical to `DiffusionGemmaForBlockDiffusion.generate`.
- `StaticBlockCache`: preallocated K/V buffers (HF StaticLayer per layer) sized for the whole generation; the encoder
  writes each block in place and the decoder always sees `max_length + canvas` keys, so a compiled / CUDA-graph step
  keeps one shape for the whole call. Sliding windows are enforced by the masks. Same math, different float
  summation order (masked slots), so tokens match the reference only where no near-tie flips.

Positions follow the reference: slot indices (left padding included), the same for every row; RoPE is relative, so
the padding offset cancels in attention scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import Cache, StaticLayer
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    bidirectional_mask_function,
    causal_mask_function,
    sliding_window_causal_mask_function,
)

from dg_pipeline.core.errors import InputError

STATIC_CACHE_ATTENTION = ("sdpa", "eager")


@dataclass
class DecoderView:
    """What the decoder attends to while denoising one block."""

    cache: Cache
    masks: dict[str, torch.Tensor | None]  # per layer type; None = attend to everything (no padding)
    positions: torch.Tensor  # (1, C) int32 canvas positions


def _positions(start: int, length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + length, dtype=torch.int32, device=device).unsqueeze(0)


class DynamicBlockCache:
    """The reference's cache and masks: bit-identical generation; the decoder concatenates each step's canvas keys."""

    def __init__(self, model, attention_mask: torch.Tensor):
        self.model = model
        self.cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        self.attention_mask = attention_mask  # (B, length) bool over committed slots
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    def append(self, tokens: torch.Tensor) -> None:
        """Run the encoder over `tokens` (the prompt, then each finished block) and keep their keys/values."""
        n = tokens.shape[1]
        if self.length > 0:
            self.attention_mask = F.pad(self.attention_mask, (0, n), value=True)
        positions = _positions(self.length, n, tokens.device)
        encoder = self.model.model.encoder
        masks = encoder.create_masks_for_generate(
            config=self.model.config,
            inputs_embeds=torch.empty((tokens.shape[0], n, 0), dtype=self.model.dtype, device=tokens.device),
            attention_mask=self.attention_mask,
            past_key_values=self.cache,
            position_ids=positions,
        )
        encoder(input_ids=tokens.contiguous(), attention_mask=masks, past_key_values=self.cache, position_ids=positions)
        self.length += n

    def decoder_view(self, canvas_length: int) -> DecoderView:
        device = self.attention_mask.device
        decoder_mask = F.pad(self.attention_mask, (0, canvas_length), value=True)
        masks = self.model.model.decoder.create_diffusion_decoder_attention_mask(
            config=self.model.config,
            inputs_embeds=torch.empty((self.batch_size, canvas_length, 0), dtype=self.model.dtype, device=device),
            past_key_values=self.cache,
            decoder_attention_mask=decoder_mask,
        )
        return DecoderView(self.cache, masks, _positions(self.length, canvas_length, device))

    def rows_view(self, view: DecoderView, rows: torch.Tensor) -> DecoderView:
        """The same view for a subset of rows (finished rows leave the batch; results per row are unchanged)."""
        cache = DynamicCache(ddp_cache_data=[(layer.keys[rows], layer.values[rows]) for layer in self.cache.layers])
        masks = {kind: None if mask is None else mask[rows] for kind, mask in view.masks.items()}
        return DecoderView(cache, masks, view.positions)


class StaticBlockCache:
    """Preallocated K/V buffers for `max_length` committed tokens; fixed decoder shapes for compiled steps."""

    def __init__(self, model, attention_mask: torch.Tensor, max_length: int, buffers: Cache | None = None):
        """`buffers`: the Cache of an earlier StaticBlockCache of the same batch size and max_length, reused (reset)
        so compiled graphs keep their static addresses across generate() calls."""
        text_config = model.config.get_text_config(decoder=True)
        implementation = text_config._attn_implementation
        if implementation not in STATIC_CACHE_ATTENTION:
            raise InputError(
                f"sampler.kv_cache=static supports attn_implementation {list(STATIC_CACHE_ATTENTION)}, the model uses "
                f"{implementation!r}; set sampler.kv_cache=dynamic (and compile=false) or load the model with sdpa"
            )
        self.model = model
        self.text_config = text_config
        self.mask_interface = ALL_MASK_ATTENTION_FUNCTIONS[implementation]
        self.max_length = max_length
        if buffers is not None:
            buffers.reset()
            self.cache = buffers
        else:
            self.cache = Cache(layers=[StaticLayer(max_cache_len=max_length) for _ in text_config.layer_types])
        batch, prompt_length = attention_mask.shape
        self.key_valid = torch.zeros((batch, max_length), dtype=torch.bool, device=attention_mask.device)
        self.key_valid[:, :prompt_length] = attention_mask
        self._prompt_length = prompt_length
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.key_valid.shape[0]

    def _mask(self, q_length: int, q_offset: int, kv_length: int, mask_function, key_valid: torch.Tensor):
        return self.mask_interface(
            batch_size=self.batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=0,
            mask_function=mask_function,
            attention_mask=key_valid,
            allow_is_causal_skip=False,
            allow_is_bidirectional_skip=False,
            dtype=self.model.dtype,
            config=self.text_config,
            device=key_valid.device,
        )

    def append(self, tokens: torch.Tensor) -> None:
        n = tokens.shape[1]
        if self.length + n > self.max_length:
            raise RuntimeError(f"static cache overflow: {self.length} + {n} > {self.max_length} (a sizing bug)")
        if self.length >= self._prompt_length:
            self.key_valid[:, self.length : self.length + n] = True
        functions = {
            "full_attention": causal_mask_function,
            "sliding_attention": sliding_window_causal_mask_function(self.text_config.sliding_window),
        }
        masks = {
            kind: self._mask(n, self.length, self.max_length, functions[kind], self.key_valid)
            for kind in set(self.text_config.layer_types)
        }
        positions = _positions(self.length, n, tokens.device)
        self.model.model.encoder(
            input_ids=tokens.contiguous(), attention_mask=masks, past_key_values=self.cache, position_ids=positions
        )
        self.length += n

    def decoder_view(self, canvas_length: int) -> DecoderView:
        # The decoder appends the canvas keys right after the committed ones: [committed | canvas | unused slots].
        start = self.length
        keys = torch.zeros((self.batch_size, self.max_length + canvas_length), dtype=torch.bool,
                           device=self.key_valid.device)
        keys[:, :start] = self.key_valid[:, :start]
        keys[:, start : start + canvas_length] = True
        # Sliding layers see the last window-1 committed tokens before the block, as the reference's cache keeps them.
        window_keys = keys.clone()
        window_keys[:, : max(0, start - self.text_config.sliding_window + 1)] = False
        kv_length = self.max_length + canvas_length
        masks = {}
        for kind in set(self.text_config.layer_types):
            valid = window_keys if kind == "sliding_attention" else keys
            masks[kind] = self._mask(canvas_length, 0, kv_length, bidirectional_mask_function, valid)
        return DecoderView(self.cache, masks, _positions(start, canvas_length, self.key_valid.device))
