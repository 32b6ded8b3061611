"""The denoising temperature schedule.

Denoising runs steps n = N, N-1, ..., 1 (n counts the steps *remaining*, as in the reference), and step n uses
temperature t_min + (t_max - t_min) * n / N: t_max on the first step, t_min + (t_max - t_min)/N on the last.
"""

from __future__ import annotations

import torch


class LinearTemperatureSchedule:
    """Linear temperature schedule from t_max (first step, n=N) down to the last step (n=1)."""

    def __init__(self, t_min: float, t_max: float, num_steps: int):
        self.t_min = t_min
        self.t_max = t_max
        self.num_steps = num_steps

    def steps(self) -> range:
        """Step numbers in the order they run: N, N-1, ..., 1."""
        return range(self.num_steps, 0, -1)

    def __call__(self, step: int) -> float:
        return float(self.table()[step])

    def table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Float32 temperatures indexed by step number (index 0 unused).

        Same float32 arithmetic as the reference's per-step int32 tensor, so dividing logits by an entry is
        bit-identical to its temperature processor.
        """
        n = torch.arange(self.num_steps + 1, dtype=torch.int32, device=device)
        return self.t_min + ((self.t_max - self.t_min) * (n / self.num_steps))
