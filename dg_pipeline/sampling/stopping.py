"""Stopping rules: when a row's block is done denoising, and when a row's sequence is done (end-of-sequence)."""

from __future__ import annotations

import torch


class StableAndConfidentStop:
    """A row's block is done when its argmax canvas equals each of the previous `stability_threshold` argmax canvases
    (stable) and its mean per-position entropy is below `confidence_threshold` (confident).

    Stateful per block: `reset` before the first step, then call once per step.
    """

    def __init__(self, stability_threshold: int, confidence_threshold: float):
        self.stability_threshold = stability_threshold
        self.confidence_threshold = confidence_threshold
        self._history: torch.Tensor | None = None
        self._slot = 0

    def reset(self, batch_size: int, canvas_length: int, device: torch.device | str = "cpu") -> None:
        # -1 is never a token id, so nothing is stable before `stability_threshold` steps have run.
        self._history = torch.full(
            (self.stability_threshold, batch_size, canvas_length), -1, dtype=torch.long, device=device
        )
        self._slot = 0

    def __call__(
        self, argmax_canvas: torch.Tensor, entropy: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B', C) argmax canvas and entropies of the rows `rows` (None = all rows) -> (B',) bool: done."""
        if self._history is None:
            self.reset(argmax_canvas.shape[0], argmax_canvas.shape[1], argmax_canvas.device)
        if self.stability_threshold == 0:
            stable = torch.ones(argmax_canvas.shape[0], dtype=torch.bool, device=argmax_canvas.device)
        else:
            history = self._history if rows is None else self._history[:, rows]
            stable = (history == argmax_canvas[None]).all(dim=-1).all(dim=0)
            # A ring buffer holds the same set of past canvases as the reference's roll, without the copy.
            if rows is None:
                self._history[self._slot] = argmax_canvas
            else:
                self._history[self._slot, rows] = argmax_canvas
            self._slot = (self._slot + 1) % self.stability_threshold
        confident = torch.mean(entropy, dim=-1) < self.confidence_threshold
        return stable & confident


def contains_eos(tokens: torch.Tensor, eos_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) tokens -> (B,) bool: the row holds an end-of-sequence token."""
    return torch.isin(tokens, eos_ids).any(dim=-1)


def pad_after_eos(tokens: torch.Tensor, eos_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Replace every token after a row's first end-of-sequence token by pad (the first EOS is kept)."""
    is_eos = torch.isin(tokens, eos_ids)
    eos_seen = is_eos.cumsum(dim=-1)
    after_first_eos = (eos_seen > 0) & ~((eos_seen == 1) & is_eos)
    return tokens.masked_fill(after_first_eos, pad_id)
