"""Logits error of a quantized model vs its unquantized self, on the passes a denoising step runs.

The probe for each prompt: encoder prefill, a decoder pass over a fixed random canvas without self-conditioning
(a block's first step), then a decoder pass over the same canvas self-conditioned on the *reference* model's first
logits (every later step). Inputs are identical for both models, so the relative L2 distance of the concatenated
logits measures the quantization error alone: ||q - ref|| / ||ref||.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


@torch.no_grad()
def probe_inputs(prompts: Sequence[Sequence[int]], canvas_length: int, vocab_size: int, seed: int = 0) -> list[dict]:
    """Per prompt: input_ids (1, P) and a fixed random canvas (1, C) (one prompt per pass: no padding involved)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.tensor([list(p)], dtype=torch.long),
            "decoder_input_ids": torch.randint(0, vocab_size, (1, canvas_length), generator=gen),
        }
        for p in prompts
    ]


@torch.no_grad()
def probe_logits(model: nn.Module, inputs: list[dict], self_conditioning: list[torch.Tensor] | None = None):
    """(first-step logits, self-conditioned logits) per input, float32 on the CPU.

    self_conditioning: the logits to condition the second pass on (the reference's first-step logits); None = the
    model's own first-step logits (what the reference run passes).
    """
    first, second = [], []
    for i, x in enumerate(inputs):
        x = {k: v.to(model.device) for k, v in x.items()}
        a = model(**x).logits
        sc = a if self_conditioning is None else self_conditioning[i].to(model.device)
        b = model(**x, self_conditioning_logits=sc).logits
        first.append(a.float().cpu())
        second.append(b.float().cpu())
    return first, second


def relative_l2(quantized: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    q = torch.cat([t.flatten() for t in quantized])
    r = torch.cat([t.flatten() for t in reference])
    return float((q - r).norm() / r.norm())


class LogitsErrorProbe:
    """Record the reference logits before quantizing; `error(model)` after: relative L2 per pass kind and overall."""

    def __init__(self, model: nn.Module, prompts: Sequence[Sequence[int]], seed: int = 0):
        cfg = model.config
        self.inputs = probe_inputs(prompts, cfg.canvas_length, cfg.get_text_config().vocab_size, seed)
        self.reference = probe_logits(model, self.inputs)

    def error(self, model: nn.Module) -> dict:
        ref_first, ref_second = self.reference
        first, second = probe_logits(model, self.inputs, self_conditioning=ref_first)
        return {
            "logits_relative_error": relative_l2(first + second, ref_first + ref_second),
            "first_step": relative_l2(first, ref_first),
            "self_conditioned_step": relative_l2(second, ref_second),
            "n_prompts": len(self.inputs),
            "definition": "||logits_q - logits_ref|| / ||logits_ref|| over encoder prefill + a decoder pass on a "
            "fixed random canvas, without and with self-conditioning (reference model's first logits)",
        }
