"""The random numbers of one generation, drawn in the reference's order and shapes, so a seed reproduces
`DiffusionGemmaForBlockDiffusion.generate`: per block the initial canvas (randint (B, C)), then per step the sampling
noise (the Exp(1) draws torch.multinomial makes over (B*C, V)) and the re-noising tokens (randint (B, C)), for every
row, finished or not.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import torch

from dg_pipeline.sampling.canvas import CanvasNoise

# On CPU the Exp(1) draw is serial (~50 ns per element); from this many elements per step a worker thread draws the
# next step's noise while the current step computes.
PREFETCH_MIN_ELEMENTS = 1 << 20


class StepDraws(NamedTuple):
    """The random numbers one denoising step consumes."""

    exponential: torch.Tensor  # (B, C, V) float32 Exp(1) noise for sampling every position
    fresh_tokens: torch.Tensor | None  # (B, C) re-noising tokens (None for a mask canvas)


def draw_step(noise: CanvasNoise, batch_size: int, length: int, vocab_size: int, generator, device) -> StepDraws:
    """One step's random numbers, in the reference's order: sampling noise first, then re-noising tokens."""
    exponential = torch.empty((batch_size * length, vocab_size), dtype=torch.float32, device=device)
    exponential.exponential_(1, generator=generator)
    fresh = noise.fresh_tokens(batch_size, length, generator, device)
    return StepDraws(exponential.view(batch_size, length, vocab_size), fresh)


class RandomStream:
    """Every random number of one generate() call, in order.

    With `prefetch`, a worker thread draws the next step's numbers while the current step computes. A prefetch for a
    step that never runs (the block stopped early) is rolled back by restoring the generator's state before the next
    draw, so the stream is exactly the one without prefetching.
    """

    def __init__(self, noise: CanvasNoise, batch_size: int, length: int, vocab_size: int, generator, device,
                 prefetch: bool = False):
        self.noise = noise
        self.shape = (batch_size, length, vocab_size)
        self.generator = generator
        self.device = device
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dg-noise") if prefetch else None
        self._pending: Future | None = None
        self._state_before_pending: torch.Tensor | None = None

    def __enter__(self) -> "RandomStream":
        return self

    def __exit__(self, *exc) -> None:
        self._settle(keep=False)
        if self._worker is not None:
            self._worker.shutdown(wait=True)

    def initial_canvas(self) -> torch.Tensor:
        self._settle(keep=False)
        batch, length, _ = self.shape
        return self.noise.initial(batch, length, self.generator, self.device)

    def step(self, prefetch_next: bool) -> StepDraws:
        """This step's draws; with prefetch_next (another step may follow), start drawing the next step's."""
        draws = self._settle(keep=True) or self._draw()
        if prefetch_next and self._worker is not None:
            self._state_before_pending = self._get_state()
            self._pending = self._worker.submit(self._draw)
        return draws

    def _draw(self) -> StepDraws:
        return draw_step(self.noise, *self.shape, self.generator, self.device)

    def _settle(self, keep: bool) -> StepDraws | None:
        """Finish a pending prefetch: return its draws (keep), or undo them by restoring the generator."""
        if self._pending is None:
            return None
        draws, self._pending = self._pending.result(), None
        if keep:
            return draws
        self._set_state(self._state_before_pending)
        return None

    def _get_state(self) -> torch.Tensor:
        return torch.get_rng_state() if self.generator is None else self.generator.get_state()

    def _set_state(self, state: torch.Tensor) -> None:
        if self.generator is None:
            torch.set_rng_state(state)
        else:
            self.generator.set_state(state)
