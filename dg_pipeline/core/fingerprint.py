"""Stage fingerprints: a stage reruns when a config group it reads (the registry's fingerprint_keys), or its input,
changed.

`stage=all` keeps one per stage in <run_dir>/.dg_state/; a standalone `stage=quantize` records its own in quant.json,
so re-running it with other settings (or on a retrained input) re-calibrates instead of returning the old output.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Mapping

from omegaconf import DictConfig, OmegaConf

from dg_pipeline.core.registry import STAGES


def fingerprint_parts(cfg: DictConfig | Mapping, keys: Iterable[str], upstream: str) -> dict[str, str]:
    """{config group: short hash, ..., "input": short hash of `upstream`}: what a stage's output was made with (its
    gate record keeps it; a reuse compares it part by part, so the reason names what changed)."""
    parts = {}
    for k in keys:
        value = OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig) else cfg[k]
        if k == "quant":
            value.pop("formats", None)  # which formats run is not how this one is quantized
        parts[k] = _short_hash(value)
    parts["input"] = _short_hash(upstream)
    return parts


def config_fingerprint(cfg: DictConfig | Mapping, keys: Iterable[str], upstream: str) -> str:
    """A short hash of the config groups `keys` of `cfg` and of `upstream` (what the work starts from)."""
    return _short_hash(fingerprint_parts(cfg, keys, upstream))


def stage_fingerprint(cfg: DictConfig, stage: str, upstream_fingerprint: str) -> str:
    return config_fingerprint(cfg, STAGES[stage].fingerprint_keys, upstream_fingerprint)


def stage_fingerprint_parts(cfg: DictConfig, stage: str, input_dir: str | Path | None, upstream: str = ""
                            ) -> dict[str, str]:
    """A standalone stage's fingerprint: its config groups and its input dir's identity (or `upstream`, for a
    stage without an input dir)."""
    return fingerprint_parts(cfg, STAGES[stage].fingerprint_keys,
                             input_identity(input_dir) if input_dir is not None else upstream)


def _short_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def input_identity(model_dir: str | Path) -> str:
    """A standalone stage's upstream fingerprint: the input's place (its last two path parts, e.g. sft/model, so a
    run dir copied or moved elsewhere keeps its outputs) and the name, size and mtime of every file in it (a
    retrained model in the same place is a new input)."""
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    return json.dumps(["/".join(model_dir.parts[-2:])] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns]
                                                          for p in files])
