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


def config_fingerprint(cfg: DictConfig | Mapping, keys: Iterable[str], upstream: str) -> str:
    """A short hash of the config groups `keys` of `cfg` (a composed config, or plain values) and of `upstream`
    (what the work starts from)."""
    values = {k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig) else cfg[k]
              for k in keys}
    if "quant" in values:
        values["quant"].pop("formats", None)  # which formats run is not how this one is quantized
    blob = json.dumps({"upstream": upstream, "keys": values}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_fingerprint(cfg: DictConfig, stage: str, upstream_fingerprint: str) -> str:
    return config_fingerprint(cfg, STAGES[stage].fingerprint_keys, upstream_fingerprint)


def input_identity(model_dir: str | Path) -> str:
    """A standalone stage's upstream fingerprint: the input dir and the size and mtime of every file in it (a
    retrained model in the same place is a new input)."""
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    return json.dumps([str(model_dir)] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files])
