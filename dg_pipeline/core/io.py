"""Atomic writes: write to a temporary sibling, then rename, so nothing is ever left half-written.

Temporary siblings are named `.<name>.<host>-<pid>.<random>.tmp`: the next writer of the same target removes the ones
a killed process left (`remove_leftovers`), and nothing that lists outputs takes them for one (`is_leftover`).
Every JSON file is strict JSON (`strict_json`: no bare NaN/Infinity; a non-finite figure is written as null and
named under "non_finite").
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator


TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"  # the replaced target during atomic_dir's two-rename swap
REJECTED = ".failed"  # <name>.failed: an output kept for reading because its gate failed (never published)
NON_FINITE = "non_finite"  # strict_json's record of the figures it wrote as null


def _host() -> str:
    return socket.gethostname().replace(".", "_").replace("-", "_")


def _tmp_prefix(name: str) -> str:
    return f".{name}.{_host()}-{os.getpid()}."


def is_leftover(path: str | os.PathLike) -> bool:
    """A temporary sibling of an atomic write (ours, or a killed process's): never an output."""
    name = Path(path).name
    return name.startswith(".") and (name.endswith(TMP_SUFFIX) or name.endswith(OLD_SUFFIX))


def gate_records(root: str | os.PathLike, pattern: str = "**/verify.json") -> list[Path]:
    """The verify.json files under `root` that belong to outputs: none inside a killed writer's temporary dir or a
    rejected bundle (<name>.failed)."""
    root = Path(root)
    return sorted(p for p in root.glob(pattern)
                  if not any(is_leftover(part) or part.endswith(REJECTED) for part in p.relative_to(root).parts))


def _writer_alive(tmp_name: str, target_name: str) -> bool:
    """Whether the process that made temporary sibling `tmp_name` of `target_name` may still be writing it: its pid
    runs on this host. Another host's is left alone; a name without an owner (older versions) is a leftover."""
    host, _, pid = tmp_name[len(target_name) + 2:].split(".", 1)[0].rpartition("-")
    if not host or not pid.isdigit():
        return False
    if host != _host():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_leftovers(target: str | os.PathLike, say=print) -> list[Path]:
    """Remove the temporary siblings of `target` that a killed writer left (one line each), and put back a target
    that a swap interrupted between its two renames. Returns what was removed."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    old = target.with_name(f".{target.name}{OLD_SUFFIX}")
    if old.exists() and not target.exists():
        os.replace(old, target)
        say(f"recovered {target} (a replacement was interrupted between its two renames)")
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    for tmp in target.parent.glob(f".{glob.escape(target.name)}.*{TMP_SUFFIX}"):
        if _writer_alive(tmp.name, target.name):
            continue
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        removed.append(tmp)
        say(f"removed {tmp}: left by a writer of {target} that no longer runs")
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, dumps_json(obj, indent=2) + "\n")


def dumps_json(obj: Any, indent: int | None = None) -> str:
    """The pipeline's one JSON encoder: strict JSON (see `strict_json`), tensors and paths as plain values."""
    return json.dumps(strict_json(obj), indent=indent, sort_keys=False, allow_nan=False)


def strict_json(obj: Any) -> Any:
    """`obj` as plain JSON values with every non-finite float (NaN, +-Infinity) replaced by null; a dict at the top
    gets a "non_finite" map {dotted key: "nan" | "inf" | "-inf"} saying which figures were not numbers and why."""
    found: dict[str, str] = {}

    def walk(o: Any, where: str) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            found[where or "value"] = "nan" if math.isnan(o) else ("inf" if o > 0 else "-inf")
            return None
        if isinstance(o, dict):
            return {str(k): walk(v, f"{where}.{k}" if where else str(k)) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(o)]
        if o is None or isinstance(o, (str, int, bool, float)):
            return o
        return walk(_json_default(o), where)

    plain = walk(obj, "")
    if found and isinstance(plain, dict):
        plain[NON_FINITE] = {**(plain.get(NON_FINITE) or {}), **found}
    return plain


def read_json(path: str | os.PathLike) -> Any:
    from dg_pipeline.core.errors import InputError

    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); fix or delete the file (the stage "
                         "that wrote it rewrites it)") from None


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory next to `target`; on success it replaces `target` in one rename.

    On error the temporary directory is removed and an existing `target` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    if target.exists() and not overwrite:
        from dg_pipeline.core.errors import InputError

        raise InputError(f"{target} already exists; pass overwrite=true (export.overwrite=true) to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target.name), suffix=TMP_SUFFIX, dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; a served bundle must be readable by others
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}{OLD_SUFFIX}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_default(o: Any) -> Any:
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o)}")
