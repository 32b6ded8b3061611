"""Which process does what in a multi-process run (Lightning DDP/FSDP on one node, or torchrun on several).

Two ways a run becomes several processes:
- Lightning launches it (trainer.devices=N): the job starts as ONE process (rank 0) that runs everything up to
  the first `trainer.fit`; there Lightning re-runs the same command for ranks 1..N-1 (LOCAL_RANK set). Those start
  from the top, find the earlier stages' outputs written, and join the training.
- torchrun (or SLURM through torchrun) starts every rank at once with RANK/WORLD_SIZE set: the process group is
  created at start-up (`init_launched_group`), so ranks can wait for each other from the first stage on.

Training stages run on every rank; every other piece of work (data generation, the gates, quantize, export,
bookkeeping) runs on rank 0 while the others wait (`on_rank_zero`), and learn whether it succeeded: a failure on
rank 0 stops every rank with one line instead of leaving them waiting. The run dir is resolved once, by rank 0,
and handed to the other ranks (`pinned_run_dir`, `agree_on_run_dir`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from dg_pipeline.core.errors import PipelineError

# Rank 0's run dir, inherited by the ranks Lightning launches (set only around `trainer.fit`).
RUN_DIR_ENV = "DG_PIPELINE_RUN_DIR"
# How long ranks wait for rank 0's work (a gate, a quantization of a large model) before giving up.
WAIT_TIMEOUT = timedelta(hours=12)

T = TypeVar("T")
_wait_group = None


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_rank() -> int:
    """This process's rank: from the process group, else from the launcher's environment (torchrun's RANK, or the
    LOCAL_RANK Lightning gives the ranks it launches on one node), else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for key in ("RANK", "LOCAL_RANK"):
        if os.environ.get(key) is not None:
            return int(os.environ[key])
    return 0


def is_rank_zero() -> bool:
    return global_rank() == 0


def launched_externally() -> bool:
    """True under torchrun (every rank started at once, RANK and WORLD_SIZE in the environment)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_launched_group(device: str) -> None:
    """Under torchrun, create the default process group at start-up (Lightning then uses it as it is)."""
    if not launched_externally() or dist.is_initialized():
        return
    backend = "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)


def _group():
    """A gloo group with a long timeout for waiting on rank 0 (created by every rank at its first wait)."""
    global _wait_group
    if _wait_group is None:
        _wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return _wait_group


def _broadcast_from_zero(value):
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_group())
    return box[0]


def on_rank_zero(work: Callable[[], T], what: str) -> T | None:
    """Run `work` on rank 0 only; the other ranks wait for it and then return None. If it fails on rank 0, the
    other ranks raise too (naming `what`). Before the process group exists (a Lightning-launched rank starting
    up), the other ranks skip `work`: rank 0 did it before launching them."""
    if not distributed():
        return work() if is_rank_zero() else None
    if not is_rank_zero():
        status = _broadcast_from_zero(None)
        if status != "ok":
            raise PipelineError(f"rank 0 failed in {what} ({status}); rank {global_rank()} stops too")
        return None
    status = "interrupted"
    try:
        result = work()
        status = "ok"
        return result
    except BaseException as e:  # noqa: BLE001 - the other ranks must hear of any failure, then it propagates
        status = f"{type(e).__name__}: {e}"
        raise
    finally:
        _broadcast_from_zero(status)


@contextmanager
def rank_zero_first(what: str) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. generates the data), then the other ranks run it (e.g. read it); a failure
    on rank 0 stops them too."""
    if not distributed():
        yield
        return
    if not is_rank_zero():
        status = _broadcast_from_zero(None)
        if status != "ok":
            raise PipelineError(f"rank 0 failed in {what} ({status}); rank {global_rank()} stops too")
        yield
        return
    status = "interrupted"
    try:
        yield
        status = "ok"
    except BaseException as e:  # noqa: BLE001 - reported to the other ranks, then propagated
        status = f"{type(e).__name__}: {e}"
        raise
    finally:
        _broadcast_from_zero(status)


def wait_for_rank_zero(what: str) -> None:
    """Every rank waits here until rank 0 arrives (rank 0 passes straight through)."""
    on_rank_zero(lambda: None, what)


@contextmanager
def pinned_run_dir(run_dir: str) -> Iterator[None]:
    """While Lightning launches the other ranks (inside `fit`), they inherit rank 0's run dir: `run_dir:
    runs/${now:...}` would otherwise resolve to a new dir in each of them."""
    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous


def agree_on_run_dir(resolved: str) -> str:
    """The run dir every rank uses: rank 0's. A Lightning-launched rank reads it from its environment; under
    torchrun rank 0 broadcasts it (the group exists from start-up); a single process keeps its own."""
    if os.environ.get(RUN_DIR_ENV):
        return os.environ[RUN_DIR_ENV]
    if distributed():
        return _broadcast_from_zero(resolved if is_rank_zero() else None)
    return resolved
