"""The order examples are trained in: seeded, split into global batches across ranks, resumable mid-epoch.

Epoch e visits the examples in the permutation drawn from (seed, e) (or in file order, unshuffled). Step k of the
epoch trains on the global batch `order[k*G : (k+1)*G]`, G = per-device batch x ranks, and rank r takes its slice
`[r*b : (r+1)*b]` of it. So 1 rank with batch 2b and 2 ranks with batch b train on the same global batches, in the
same order, from `seed` alone. Each item the sampler yields is an (epoch, dataset index) key: the example's noise
is seeded from it (dg_pipeline.objective.corruption).

`ResumableLoader` is a DataLoader that Lightning saves and restores with a checkpoint (its `state_dict` /
`load_state_dict`): after a restart it continues the interrupted epoch at the next unseen global batch, instead of
starting the epoch again.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from dg_pipeline.core.seeds import derived_seed

# The permutation stream of the data order (distinct from the noise streams of the same seed).
ORDER_STREAM = 2  # (the noise streams are 0 and 1)


def process_rank_and_count() -> tuple[int, int]:
    """(rank, number of ranks) of this process in the default process group; (0, 1) outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class GlobalBatchSampler(Sampler):
    """Yields this rank's (epoch, index) keys, `batch_size` per step.

    shuffle: a new seeded permutation each epoch (training); else dataset order (validation).
    drop_last: an epoch is floor(n / G) full global batches (training; at least one: a dataset smaller than one
    global batch is cycled to fill it); else ceil(n / G), the last one filled by cycling from the start of the
    order (validation: every rank gets the same number of batches, a handful of examples are seen twice).
    keyed_by_epoch: each key carries the epoch (training: an example gets new noise every epoch); False keys every
    example with epoch 0 (validation: the same noise at every validation, whatever epoch Lightning sets).
    The rank and the number of ranks are read when iterating (the process group exists only inside `fit`).
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, shuffle: bool, drop_last: bool,
                 keyed_by_epoch: bool = True):
        if num_examples <= 0:
            raise ValueError("GlobalBatchSampler needs at least one example")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.keyed_by_epoch = keyed_by_epoch
        self.epoch = 0
        self._resume_epoch: int | None = None
        self._resume_batches = 0

    def steps_per_epoch(self, ranks: int) -> int:
        global_batch = self.batch_size * ranks
        if self.drop_last:
            return max(1, self.num_examples // global_batch)
        return math.ceil(self.num_examples / global_batch)

    def epoch_order(self, epoch: int, ranks: int) -> list[int]:
        """The dataset indices of epoch `epoch`, as many as its global batches hold (cycled when short)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, ORDER_STREAM, epoch, 0))
            order = torch.randperm(self.num_examples, generator=generator).tolist()
        else:
            order = list(range(self.num_examples))
        needed = self.steps_per_epoch(ranks) * self.batch_size * ranks
        return (order * math.ceil(needed / len(order)))[:needed]

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at every epoch start (and with the restored epoch after a resume)."""
        self.epoch = int(epoch)

    def resume(self, epoch: int, batches_done: int) -> None:
        """Start epoch `epoch` after its first `batches_done` steps (they were trained before the restart)."""
        self.epoch = int(epoch)
        self._resume_epoch, self._resume_batches = int(epoch), int(batches_done)

    def __len__(self) -> int:
        return self.steps_per_epoch(process_rank_and_count()[1]) * self.batch_size

    def rank_keys(self, epoch: int, rank: int, ranks: int, first_step: int = 0) -> Iterator[tuple[int, int]]:
        """Rank `rank`'s (epoch, index) keys of epoch `epoch` from step `first_step` on."""
        order = self.epoch_order(epoch, ranks)
        global_batch = self.batch_size * ranks
        key_epoch = epoch if self.keyed_by_epoch else 0
        for step in range(first_step, self.steps_per_epoch(ranks)):
            start = step * global_batch + rank * self.batch_size
            for index in order[start : start + self.batch_size]:
                yield key_epoch, index

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rank, ranks = process_rank_and_count()
        epoch = self.epoch
        skip = self._resume_batches if self._resume_epoch == epoch else 0
        self._resume_epoch, self._resume_batches = None, 0
        yield from self.rank_keys(epoch, rank, ranks, first_step=skip)


class ResumableLoader(DataLoader):
    """A DataLoader over a GlobalBatchSampler whose position Lightning saves in checkpoints (`state_dict`) and
    restores before the first batch after a restart (`load_state_dict`)."""

    def __init__(self, dataset, sampler: GlobalBatchSampler, collate_fn, num_workers: int = 0):
        super().__init__(dataset, batch_size=sampler.batch_size, sampler=sampler, collate_fn=collate_fn,
                         num_workers=num_workers)
        self._batches_done = 0  # batches yielded in the current epoch (with the resumed ones)

    def __iter__(self):
        sampler: GlobalBatchSampler = self.sampler
        resuming = sampler._resume_epoch == sampler.epoch
        self._batches_done = sampler._resume_batches if resuming else 0
        for batch in super().__iter__():
            self._batches_done += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches_done": self._batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.resume(state["epoch"], state["batches_done"])
