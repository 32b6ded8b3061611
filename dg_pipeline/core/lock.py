"""One writer per output: a stage holds an exclusive lock on its output while it runs.

The lock is an fcntl lock on <run_dir>/.locks/<output>.lock (the output's path under the run dir, `/` as `+`), which
holds who took it: pid, host, command line, since when. A second process asking for the same output gets an
OutputLocked error naming the first; the kernel drops the lock of a process that dies, so a lock file left by a
killed run is taken over, with one line naming the process it belonged to.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from dg_pipeline.core.errors import PipelineError

LOCK_DIR = ".locks"


class OutputLocked(PipelineError):
    """Another process is writing the same output."""


def lock_path(run_dir: Path, output: Path) -> Path:
    relative = Path(output).resolve().relative_to(Path(run_dir).resolve())
    return Path(run_dir) / LOCK_DIR / (str(relative).replace(os.sep, "+") + ".lock")


def _holder() -> dict:
    command = " ".join(shlex.join(getattr(sys, "orig_argv", sys.argv)).split())  # one line, however it was started
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command[:400],
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} "
            f"(`{holder.get('command')}`)")


def _read_holder(f) -> dict:
    f.seek(0)
    try:
        return json.loads(f.read() or "{}")
    except json.JSONDecodeError:
        return {}


@contextlib.contextmanager
def output_lock(run_dir: str | os.PathLike, output: str | os.PathLike, say: Callable[[str], None] = print
                ) -> Iterator[Path]:
    """Hold the lock of `output` (a path under `run_dir`) for the block; OutputLocked when another process holds it."""
    path = lock_path(Path(run_dir), Path(output))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLocked(
                f"{output} is being written by another process: {_describe(_read_holder(f))}; wait for it to finish "
                f"or stop it (lock: {path})"
            ) from None
        previous = _read_holder(f)
        if previous.get("pid") and (previous.get("pid"), previous.get("host")) != (os.getpid(), socket.gethostname()):
            say(f"{output}: took over the lock of {_describe(previous)}, which no longer runs")
        f.seek(0)
        f.truncate()
        f.write(json.dumps(_holder()))
        f.flush()
        try:
            yield path
        finally:
            f.seek(0)
            f.truncate()  # released: an empty lock file is nobody's
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)

