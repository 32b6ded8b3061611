"""Which training checkpoint a restarted run resumes from (<stage>/exp/checkpoints/).

NeMo's checkpoint callback touches `<name>-unfinished` before it writes a checkpoint and removes it once every rank
has finished writing. A run killed in between (kill -9, a full disk) leaves the marker beside a partial file or
DCP directory. NeMo's own resume then refuses to start (a raw ValueError when the newest "last" checkpoint is the
unfinished one), even when a complete checkpoint is there. Instead, `recover_checkpoints` (rank 0) removes every
unfinished checkpoint, saying so in one line each; `newest_complete_checkpoint` (any rank, after that) is the one
the trainer resumes from.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nemo.utils.callbacks.nemo_model_checkpoint import NeMoModelCheckpoint

CHECKPOINT_SUFFIX = ".ckpt"
UNFINISHED_SUFFIX = NeMoModelCheckpoint.UNFINISHED_CHECKPOINT_SUFFIX
# <stage>-<step>.ckpt (the top-1 by val/loss) and <stage>-<step>-last.ckpt (exp_manager's file name pattern)
_STEP = re.compile(r"-(\d+)(-last)?\.ckpt$")
# A DCP checkpoint (sharded runs) is a directory; DCP writes its .metadata after every shard.
DCP_METADATA = ".metadata"


@dataclass(frozen=True)
class ResumePoint:
    path: Path
    step: int


def checkpoint_step(path: Path) -> tuple[int, bool] | None:
    """(global step, is a "last" checkpoint) from a checkpoint's name; None for other files."""
    match = _STEP.search(path.name)
    return (int(match.group(1)), bool(match.group(2))) if match else None


def is_complete(path: Path) -> bool:
    """A checkpoint file, or a DCP checkpoint dir that holds its metadata, with no unfinished marker."""
    if NeMoModelCheckpoint.is_checkpoint_unfinished(path):
        return False
    return path.is_file() or (path.is_dir() and (path / DCP_METADATA).is_file())


def recover_checkpoints(checkpoint_dir: Path, say: Callable[[str], None] = print) -> ResumePoint | None:
    """Remove the checkpoints an interrupted save left unfinished; return the newest complete one (None: none)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    for marker in sorted(checkpoint_dir.glob(f"*{UNFINISHED_SUFFIX}")):
        stem = marker.name[: -len(UNFINISHED_SUFFIX)]
        for partial in checkpoint_dir.glob(f"{stem}*{CHECKPOINT_SUFFIX}"):
            if NeMoModelCheckpoint.format_checkpoint_unfinished_marker_path(partial) == marker:
                shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
        marker.unlink()
        say(f"resume: checkpoint {stem}{CHECKPOINT_SUFFIX} was still being written when the previous run stopped "
            f"(NeMo's {UNFINISHED_SUFFIX} marker); removed it")
    return newest_complete_checkpoint(checkpoint_dir, say)


def newest_complete_checkpoint(checkpoint_dir: Path, say: Callable[[str], None] = lambda _: None
                               ) -> ResumePoint | None:
    """The newest complete checkpoint in `checkpoint_dir` (None: none), ignoring unfinished ones."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    candidates = []
    for path in checkpoint_dir.iterdir():
        step = checkpoint_step(path)
        if step is None or path.name.endswith(f"-EMA{CHECKPOINT_SUFFIX}"):
            continue
        if is_complete(path):
            candidates.append((step[0], step[1], path))
        else:
            say(f"resume: {path} is incomplete (unfinished marker or no {DCP_METADATA}); not resumed from")
    if not candidates:
        return None
    step, _, path = max(candidates)  # the newest step; at equal steps the "last" copy
    return ResumePoint(path, step)
