"""One small module per stage; each only wires components together. `run_stage` dispatches on cfg.stage."""

from __future__ import annotations

import importlib
from pathlib import Path

from omegaconf import DictConfig

from dg_pipeline.core.errors import InputError
from dg_pipeline.core.ranks import on_rank_zero
from dg_pipeline.core.rundir import RunDir

STAGES = ("base", "pretrain", "sft", "eval", "quantize", "export", "check", "plan", "all")
# Stages whose work every rank does (they train); the others run on rank 0 alone.
EVERY_RANK_STAGES = ("pretrain", "sft", "all")


def run_stage(cfg: DictConfig):
    """Run cfg.stage (stage=all drives the others through `run_stage_tracked`)."""
    stage = str(cfg.stage)
    if stage not in STAGES:
        raise InputError(f"stage={stage}: unknown stage; choose one of {', '.join(STAGES)}")
    if stage in ("all", "check", "plan"):
        run = importlib.import_module(f"dg_pipeline.stages.{stage}").run
        return run(cfg) if stage in EVERY_RANK_STAGES else on_rank_zero(lambda: run(cfg), f"stage={stage}")
    return run_stage_tracked(cfg)


def run_stage_tracked(cfg: DictConfig, variant: str | None = None):
    """Run one stage (on every rank or on rank 0, see EVERY_RANK_STAGES), then log its verify.json metrics and
    output artifact to W&B from rank 0 (lineage to its input)."""
    stage = str(cfg.stage)
    run = importlib.import_module(f"dg_pipeline.stages.{stage}").run
    if stage in EVERY_RANK_STAGES:
        result = run(cfg)
        on_rank_zero(lambda: _track(cfg, stage, variant), f"stage={stage}: tracking")
        return result
    label = f"stage={stage}" + (f"[{variant}]" if variant else "")
    return on_rank_zero(lambda: _run_and_track(run, cfg, stage, variant), label)


def _run_and_track(run, cfg: DictConfig, stage: str, variant: str | None):
    result = run(cfg)
    _track(cfg, stage, variant)
    return result


def _track(cfg: DictConfig, stage: str, variant: str | None) -> None:
    from dg_pipeline.tracking import artifact_name, track_stage

    rd = RunDir.from_cfg(cfg)
    out_dir, variant, upstream = _output_and_upstream(cfg, rd, stage, variant)
    if out_dir is not None and out_dir.exists():
        track_stage(cfg, stage, out_dir, variant=variant,
                    upstream=artifact_name(rd.root, *upstream) if upstream else None)


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
