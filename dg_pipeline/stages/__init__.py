"""One small module per stage; each only wires components together. `run_stage` dispatches on cfg.stage."""

from __future__ import annotations

import importlib
from pathlib import Path

from omegaconf import DictConfig

from dg_pipeline.core.errors import InputError
from dg_pipeline.core.rundir import RunDir

STAGES = ("base", "pretrain", "sft", "eval", "quantize", "export", "check", "all")


def run_stage(cfg: DictConfig):
    """Run cfg.stage (stage=all drives the others through `run_stage_tracked`)."""
    stage = str(cfg.stage)
    if stage not in STAGES:
        raise InputError(f"stage={stage}: unknown stage; choose one of {', '.join(STAGES)}")
    if stage in ("all", "check"):
        return importlib.import_module(f"dg_pipeline.stages.{stage}").run(cfg)
    return run_stage_tracked(cfg)


def run_stage_tracked(cfg: DictConfig, variant: str | None = None):
    """Run one stage, then log its verify.json metrics and output artifact to W&B (lineage to its input)."""
    from dg_pipeline.tracking import artifact_name, track_stage

    stage = str(cfg.stage)
    result = importlib.import_module(f"dg_pipeline.stages.{stage}").run(cfg)
    rd = RunDir.from_cfg(cfg)
    out_dir, variant, upstream = _output_and_upstream(cfg, rd, stage, variant)
    if out_dir is not None and out_dir.exists():
        track_stage(cfg, stage, out_dir, variant=variant,
                    upstream=artifact_name(rd.root, *upstream) if upstream else None)
    return result


def _output_and_upstream(cfg: DictConfig, rd: RunDir, stage: str, variant: str | None):
    """Where a stage wrote, its variant label, and (stage, variant) of the stage it consumed."""
    if stage == "base":
        return rd.model_dir("base"), None, None
    if stage == "pretrain":
        return rd.model_dir("pretrain"), None, ("base", None)
    if stage == "sft":
        return rd.model_dir("sft"), None, ("pretrain" if rd.model_dir("pretrain").exists() else "base", None)
    if stage == "eval":
        return rd.stage("eval"), None, ("sft", None)
    if stage == "quantize":
        from dg_pipeline.stages.quantize import output_name

        fmt = variant or output_name(cfg)
        return rd.stage("quantize") / fmt, fmt, ("sft", None)
    if stage == "export":
        from dg_pipeline.stages.export import export_name, quantize_input

        name = variant or export_name(cfg, rd)
        upstream = ("quantize", quantize_input(cfg, rd).name) if cfg.export.format == "hf" else ("sft", None)
        return rd.stage("export") / name, name, upstream
    return None, None, None
