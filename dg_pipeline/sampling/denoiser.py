"""One denoising forward: canvas (+ the previous step's prediction, for self-conditioning) -> soft-capped logits.

`DecoderPass` composes the HF decoder's own submodules (embeddings, self-conditioning block, layers, final norm,
lm_head) in the order `DiffusionGemmaDecoderModel.forward` runs them, so the arithmetic is the model's op for op; what
changes is that the rotary tables and attention masks are built once per block by the caller instead of every step.
"""

from __future__ import annotations

import torch

from dg_pipeline.model.logits import softcap_logits
from dg_pipeline.sampling.cache import DecoderView


class DecoderPass:
    """The decoder forward of one denoising step, with per-block rotary tables passed in."""

    def __init__(self, model):
        self.model = model
        self.decoder = model.model.decoder
        text_config = model.config.get_text_config()
        self.softcap = text_config.final_logit_softcapping
        self.layer_types = list(text_config.layer_types[: text_config.num_hidden_layers])

    def rotary_tables(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin tables for the canvas positions, per layer type (the decoder recomputes these every step)."""
        like = self.decoder.embed_tokens.weight[:1]  # only its dtype and device are used
        return {kind: self.decoder.rotary_emb(like, positions, kind) for kind in self.decoder.unique_layer_types}

    def self_conditioning_probs(self, tempered_logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The next step's self-conditioning input: the softmax of this step's tempered logits cast to the model
        dtype, as the decoder computes it. In float32 that is this step's sampling softmax `probs`, reused as is."""
        dtype = self.decoder.embed_tokens.weight.dtype
        if dtype == torch.float32:
            return probs
        return tempered_logits.to(dtype).softmax(dim=-1, dtype=torch.float32).to(dtype)

    def __call__(
        self,
        canvas: torch.Tensor,
        self_conditioning_probs: torch.Tensor | None,
        view: DecoderView,
        rotary: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        embed = self.decoder.embed_tokens
        inputs_embeds = embed(canvas)
        if self_conditioning_probs is None:
            # First step of a block: no previous prediction, a zero signal.
            soft_embeddings = torch.zeros_like(inputs_embeds)
        else:
            soft_embeddings = torch.matmul(self_conditioning_probs, embed.weight) * embed.embed_scale.to(
                inputs_embeds.dtype
            )
        hidden = self.decoder.self_conditioning(inputs_embeds, soft_embeddings)
        for layer, kind in zip(self.decoder.layers, self.layer_types):
            hidden = layer(
                hidden,
                position_embeddings=rotary[kind],
                attention_mask=view.masks[kind],
                position_ids=view.positions,
                past_key_values=view.cache,
            )
        return softcap_logits(self.model.lm_head(self.decoder.norm(hidden)), self.softcap)
