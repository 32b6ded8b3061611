"""Seeds derived from a run's seed: one generator per (purpose, epoch, item), independent of process layout.

`derived_seed(seed, stream, epoch, index)` hashes its parts (splitmix64), so nearby inputs give unrelated seeds:
the data order of epoch e (dg_pipeline.data.order) and the noise of example i in epoch e
(dg_pipeline.objective.corruption) are the same on any number of ranks and after a restart.
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of the splitmix64 finaliser."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derived_seed(seed: int, stream: int, epoch: int, index: int) -> int:
    """A 63-bit generator seed from (seed, stream, epoch, index)."""
    x = 0
    for part in (seed, stream, epoch, index):
        x = _splitmix64(x ^ (int(part) & _MASK64))
    return x >> 1
