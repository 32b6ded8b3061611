"""manifest.json: the sha256 and size of every file of an export, written last and verified on every load.

A release bundle is copied around (object stores, model hubs, scp); the manifest makes a truncated, edited or
swapped file an error naming the file instead of a model that loads and answers wrongly. Export writes it; every
loader (model dirs, export bundles) verifies it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from dg_pipeline.core.errors import InputError
from dg_pipeline.core.io import atomic_write_json, read_json

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def bundle_files(export_dir: Path) -> list[str]:
    """Every file of the bundle (relative, sorted), except the manifest itself and hidden temp files."""
    return sorted(
        p.relative_to(export_dir).as_posix()
        for p in export_dir.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    )


def write_manifest(export_dir: str | Path) -> Path:
    export_dir = Path(export_dir)
    files = {
        name: {"sha256": sha256_file(export_dir / name), "bytes": (export_dir / name).stat().st_size}
        for name in bundle_files(export_dir)
    }
    return atomic_write_json(export_dir / MANIFEST, {"version": MANIFEST_VERSION, "algorithm": "sha256", "files": files})


def manifest_problems(export_dir: str | Path) -> list[tuple[str, str]]:
    """(file, problem) for every file that differs from manifest.json, is missing, or is not listed."""
    export_dir = Path(export_dir)
    manifest = read_json(export_dir / MANIFEST)
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        return [(MANIFEST, "no `files` map")]
    problems = []
    for name, entry in sorted(listed.items()):
        path = export_dir / name
        if not path.is_file():
            problems.append((name, "listed in manifest.json but missing"))
        elif path.stat().st_size != entry.get("bytes"):
            problems.append((name, f"size {path.stat().st_size} bytes, manifest.json says {entry.get('bytes')} "
                                   "(truncated or modified)"))
        elif sha256_file(path) != entry.get("sha256"):
            problems.append((name, "sha256 differs from manifest.json (the file was modified)"))
    for name in bundle_files(export_dir):
        if name not in listed:
            problems.append((name, "not listed in manifest.json (added after the export)"))
    return problems


def verify_manifest(export_dir: str | Path) -> None:
    """Raise InputError naming every file that does not match manifest.json (missing manifest included)."""
    export_dir = Path(export_dir)
    if not (export_dir / MANIFEST).exists():
        raise InputError(
            f"{export_dir}: no {MANIFEST}, so its files cannot be verified; load exports written by "
            "`stage=export` (or re-export this one)"
        )
    problems = manifest_problems(export_dir)
    if problems:
        lines = "; ".join(f"{export_dir / name}: {problem}" for name, problem in problems)
        raise InputError(f"{export_dir}: the export does not match its {MANIFEST}: {lines}. Restore the files or "
                         "re-export")
