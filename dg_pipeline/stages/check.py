"""Stage `check`: apply the loader rules (dg_pipeline.export.checker, export/FORMAT.md) to exported directories.

    python -m dg_pipeline stage=check input=<exported dir>      one directory (any producer, not only this one)
    python -m dg_pipeline stage=check run_dir=<dir>             every <run_dir>/export/<name>/

Prints one line per directory; on any violation raises CheckFailed, whose message lists EVERY violation (tensor or
file, rule, fix), one per line, and the entry point exits 1. Writes nothing. A bundle without manifest.json fails
unless export.skip_hashes=true. Under a run dir, only published bundles are checked: a killed writer's temporary dir
(.<name>.*.tmp) and a bundle that failed its gate (<name>.failed) are listed as skipped, never as a PASS.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console

from dg_pipeline.core import InputError, RunDir
from dg_pipeline.core.io import REJECTED, is_leftover
from dg_pipeline.export import CheckFailed, check_export
from dg_pipeline.settings import RunSettings

STAGE = "check"
console = Console()


def export_dirs(cfg: DictConfig) -> list[Path]:
    """input= if given, else every exported dir under <run_dir>/export/."""
    explicit = RunSettings.from_cfg(cfg).input
    if explicit:
        path = Path(str(explicit)).expanduser().resolve()
        if not path.is_dir():
            raise InputError(f"input={explicit}: directory not found; point input= at an exported checkpoint dir")
        return [path]
    root = RunDir.from_cfg(cfg).stage("export")
    dirs, skipped = [], []
    for p in sorted(root.glob("*") if root.is_dir() else []):
        if not p.is_dir():
            continue
        if is_leftover(p) or p.name.endswith(REJECTED):
            skipped.append(p)
        elif (p / "config.json").exists():
            dirs.append(p)
    for p in skipped:
        why = "a bundle that failed its gate" if p.name.endswith(REJECTED) else "a killed writer's temporary dir"
        console.print(f"[yellow]skip[/] {p}: {why}, not a release")
    if not dirs:
        raise InputError(f"stage=check found no exported dir under {root}: run `stage=export run_dir="
                         f"{root.parent}` first, or pass input=<exported dir>")
    return dirs


def run(cfg: DictConfig) -> dict:
    skip_hashes = RunSettings.from_cfg(cfg).export.skip_hashes
    failed: dict[Path, list] = {}
    results = {}
    for path in export_dirs(cfg):
        violations = check_export(path, require_manifest=True, skip_hashes=skip_hashes)
        results[str(path)] = [str(v) for v in violations]
        note = " (export.skip_hashes=true: file hashes not verified)" if skip_hashes else ""
        if violations:
            failed[path] = violations
            console.print(f"[bold red]FAIL[/] {path}: {len(violations)} violation(s){note}")
        else:
            console.print(f"[green]PASS[/] {path}: vLLM's start-up attributes and loader rules hold{note}")
    if failed:
        raise CheckFailed(failed)
    return {"stage": STAGE, "checked": results, "passed": True}
