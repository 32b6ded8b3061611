"""Entry point: `python -m dg_pipeline stage=<stage> recipe=<recipe> run_dir=<dir> [overrides]`.

It composes the Hydra config (conf/ + recipes/), settles the run dir every rank of a multi-process run shares
(rank 0's, dg_pipeline.core.ranks), and dispatches to one stage module.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Keep third-party start-up quiet and offline: no telemetry, no hub look-ups (weights and data are local only).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# W&B prints a page per run; tracking.py prints one line per stage instead.
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from nemo.core.config import hydra_runner  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from dg_pipeline.settings import CONF_DIR  # noqa: E402


@hydra_runner(config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from omegaconf import open_dict

    from dg_pipeline.core.errors import PipelineError
    from dg_pipeline.core.ranks import agree_on_run_dir, init_launched_group
    from dg_pipeline.stages import run_stage

    try:
        init_launched_group(str(cfg.get("device", "auto")))
        with open_dict(cfg):
            cfg.run_dir = agree_on_run_dir(str(Path(str(cfg.run_dir)).expanduser().resolve()))
        run_stage(cfg)
    except PipelineError as e:
        # One clear line for errors the user can fix; tracebacks are for bugs.
        print(f"\nerror: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
