"""Weights & Biases tracking of stage outputs: metrics from verify.json and each output as a lineage artifact.

Every stage's output (base -> sft -> quantize -> export) is logged as an artifact named
`<run-name>-<stage>[-<variant>]`. Online, the consuming stage calls `use_artifact` on its input, so W&B draws
the lineage graph. Offline (the default: no account or network) W&B refuses `use_artifact`, so the edge is
recorded in the artifact's metadata (`derived_from`) and in the run config; `wandb sync` uploads both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dg_pipeline.core.io import read_json


def artifact_name(run_dir: Path, stage: str, variant: str | None = None) -> str:
    # W&B artifact names allow [A-Za-z0-9_.-]; the run dir's name keeps runs apart within a project.
    base = f"{run_dir.name}-{stage}" + (f"-{variant}" if variant else "")
    return "".join(c if (c.isalnum() or c in "_.-") else "_" for c in base)


def flat_metrics(record: dict[str, Any], prefix: str) -> dict[str, float]:
    """Numeric fields of a verify.json record (checks included) as `prefix/key` scalars."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, bool):
            out[f"{prefix}/{key}"] = float(value)
        elif isinstance(value, (int, float)):
            out[f"{prefix}/{key}"] = float(value)
    for check in record.get("checks", []) or []:
        if isinstance(check.get("value"), (int, float)) and not isinstance(check.get("value"), bool):
            out[f"{prefix}/check/{check['name']}"] = float(check["value"])
    return out


def track_stage(
    cfg: DictConfig,
    stage: str,
    out_dir: Path,
    variant: str | None = None,
    upstream: str | None = None,
) -> str | None:
    """Log a finished stage to W&B: verify.json metrics + `out_dir` as an artifact. Returns the artifact name.

    `upstream` is the artifact name of the stage's input (None for base).
    """
    mode = str(cfg.logger.mode)
    if mode == "disabled":
        return None
    import wandb

    run_dir = Path(str(cfg.run_dir)).resolve()
    name = artifact_name(run_dir, stage, variant)
    verify_path = out_dir / "verify.json" if (out_dir / "verify.json").exists() else out_dir.parent / "verify.json"
    record = read_json(verify_path) if verify_path.exists() else {}

    run = wandb.run
    owns_run = run is None
    if owns_run:
        run = wandb.init(
            mode=mode,
            project=str(cfg.logger.project),
            entity=cfg.logger.entity,
            dir=str(run_dir),
            group=run_dir.name,
            job_type=stage,
            name=f"{stage}-{variant}" if variant else stage,
            config=OmegaConf.to_container(cfg, resolve=True),
        )
    run_path = getattr(run.settings, "sync_dir", None) or run_dir / "wandb"
    try:
        run.config.update({"derived_from": upstream}, allow_val_change=True)
        if record:
            run.log(flat_metrics(record, stage if not variant else f"{stage}/{variant}"))
        if cfg.logger.log_artifacts:
            if upstream and mode == "online":
                run.use_artifact(f"{upstream}:latest")
            artifact = wandb.Artifact(
                name,
                type="model" if stage != "quantize" else "modelopt-state",
                metadata={"stage": stage, "variant": variant, "derived_from": upstream, "verify": record},
            )
            # A reference, not a copy: model dirs can be large and already live under the run dir.
            artifact.add_reference(Path(out_dir).resolve().as_uri(), name=stage)
            run.log_artifact(artifact)
    finally:
        if owns_run:
            run.finish()
        else:
            # The stage's own logger (Lightning's WandbLogger in sft) opened the run; close it with the stage.
            wandb.finish()
    os.environ.pop("WANDB_RUN_ID", None)
    hint = f" (upload later: wandb sync {run_path})" if mode == "offline" else ""
    print(f"[wandb] {stage}{'/' + variant if variant else ''}: metrics + artifact {name} logged{hint}")
    return name
