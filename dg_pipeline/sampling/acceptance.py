"""Acceptance rules: which canvas positions keep the denoiser's sample at a step (the rest are re-noised).

Every rule sees one `Prediction` per step (tempered logits, their softmax and per-position entropy, each computed once)
and returns a (B, C) bool mask with at least one accepted position per row.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from dg_pipeline.sampling.config import SamplerConfig


class Prediction(NamedTuple):
    """The denoiser's output at one step, after the temperature."""

    tempered_logits: torch.Tensor  # (B, C, V) float32
    probs: torch.Tensor  # (B, C, V) float32, softmax of tempered_logits
    entropy: torch.Tensor  # (B, C) float32, entropy of each position's distribution


class AcceptanceRule(Protocol):
    def __call__(self, prediction: Prediction) -> torch.Tensor: ...


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim.

    The arithmetic of torch.distributions.Categorical(logits=...).entropy(), op for op (so values are bit-identical to
    the reference's), without building a distribution object or validating its argument (a host sync).
    """
    log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
    probs = torch.softmax(log_probs, dim=-1)
    return -(torch.clamp(log_probs, min=torch.finfo(log_probs.dtype).min) * probs).sum(-1)


class EntropyBoundAcceptance:
    """Accept the k lowest-entropy positions with sum(entropies) - max(entropies) <= bound (DiffusionGemma's rule).

    The left side bounds the mutual information among the accepted tokens, so they can be committed together
    (https://arxiv.org/abs/2505.24857). The lowest-entropy position always qualifies (its left side is 0).
    """

    def __init__(self, entropy_bound: float):
        self.entropy_bound = entropy_bound

    def __call__(self, prediction: Prediction) -> torch.Tensor:
        sorted_entropy, order = torch.sort(prediction.entropy, dim=-1, descending=False)
        # Sorted ascending, so each prefix's maximum is its last element.
        within_bound = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= self.entropy_bound
        return torch.scatter(torch.zeros_like(within_bound), dim=-1, index=order, src=within_bound)


class ConfidenceThresholdAcceptance:
    """Accept every position whose most likely token has probability >= threshold, and always the row's most
    confident position, so each step commits at least one token (Fast-dLLM's parallel commit)."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, prediction: Prediction) -> torch.Tensor:
        confidence = prediction.probs.amax(dim=-1)
        accepted = confidence >= self.threshold
        return accepted.scatter(-1, confidence.argmax(dim=-1, keepdim=True), True)


def build_acceptance(config: SamplerConfig) -> AcceptanceRule:
    if config.acceptance == "confidence":
        return ConfidenceThresholdAcceptance(config.accept_threshold)
    return EntropyBoundAcceptance(config.entropy_bound)
