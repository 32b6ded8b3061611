"""The DiffusionGemma encoder read as an ordinary causal LM: lm_head on its last hidden state, soft-capped exactly as
`DiffusionGemmaForBlockDiffusion.forward` caps the decoder's logits. Used for conversion parity and the AR loss."""

from __future__ import annotations

import torch


def softcap_logits(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap) in float32, the model's final-logit soft-capping."""
    logits = logits.to(torch.float32)
    return torch.tanh(logits / cap) * cap


def encoder_causal_lm_logits(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **encoder_kwargs
) -> torch.Tensor:
    """(B, L, vocab) float32 next-token logits of the encoder (causal attention, shared weights).

    `encoder_kwargs` go to `model.model.encoder` (e.g. pixel_values, image_position_ids, past_key_values).
    """
    hidden = model.model.encoder(input_ids=input_ids, attention_mask=attention_mask, **encoder_kwargs).last_hidden_state
    return softcap_logits(model.lm_head(hidden), model.config.text_config.final_logit_softcapping)
