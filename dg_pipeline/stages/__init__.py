"""One small module per row of the stage registry (dg_pipeline.core.registry), each only wiring components, and
`all`, which plans and runs them. `run_stage` dispatches on cfg.stage.

In a multi-process run every rank enters here: a stage whose row says `every_rank` (training) runs on every rank;
any other runs on rank 0 while the others wait for it (dg_pipeline.core.ranks), and rank 0 logs it to W&B."""

from __future__ import annotations

import contextlib

from omegaconf import DictConfig

from dg_pipeline.core.errors import InputError
from dg_pipeline.core.io import remove_leftovers
from dg_pipeline.core.lock import output_lock
from dg_pipeline.core.ranks import is_rank_zero, on_rank_zero
from dg_pipeline.core.registry import STAGES as REGISTRY
from dg_pipeline.core.rundir import RunDir
from dg_pipeline.settings import RunSettings
from dg_pipeline.stages import all as all_stages
from dg_pipeline.stages import base, check, export, plan, pretrain, quantize, sft
from dg_pipeline.stages import eval as eval_stage

# stage name -> its run(cfg); a test holds these to the registry's rows.
RUNNERS = {module.STAGE: module.run for module in (base, pretrain, sft, eval_stage, quantize, export, check, plan)}
STAGES = (*REGISTRY, all_stages.STAGE)


def run_stage(cfg: DictConfig):
    """Run cfg.stage (stage=all drives the others through `run_stage_tracked`, on every rank)."""
    stage = str(cfg.stage)
    if stage not in STAGES:
        raise InputError(f"stage={stage}: unknown stage; choose one of {', '.join(STAGES)}")
    RunSettings.from_cfg(cfg)  # every group's rules, before any work
    if stage == all_stages.STAGE:
        return all_stages.run(cfg, run_stage_tracked)
    return run_stage_tracked(cfg)


def run_stage_tracked(cfg: DictConfig, variant: str | None = None):
    """Run one stage (on every rank or on rank 0, as its registry row says) holding the lock of its output (one
    writer per output; the temporary files a killed writer left are removed first), then log its verify.json
    metrics and output artifact to W&B from rank 0 (lineage to its input)."""
    stage = str(cfg.stage)
    run = RUNNERS[stage]
    with _writing(cfg, stage, variant):
        if REGISTRY[stage].every_rank:
            result = run(cfg)
            on_rank_zero(lambda: _track(cfg, stage, variant), f"stage={stage}: tracking")
            return result

        def run_and_track():
            result = run(cfg)
            _track(cfg, stage, variant)
            return result

        return on_rank_zero(run_and_track, f"stage={stage}" + (f"[{variant}]" if variant else ""))


def _track(cfg: DictConfig, stage: str, variant: str | None) -> None:
    from dg_pipeline.tracking import artifact_name, track_stage

    if not REGISTRY[stage].tracked:
        return
    rd = RunDir.from_cfg(cfg)
    out_dir, variant, upstream = _output_and_upstream(cfg, rd, stage, variant)
    if out_dir is not None and out_dir.exists():
        track_stage(cfg, stage, out_dir, variant=variant,
                    upstream=artifact_name(rd.root, *upstream) if upstream else None)


@contextlib.contextmanager
def _writing(cfg: DictConfig, stage: str, variant: str | None):
    """Rank 0 holds the lock of the stage's output (the other ranks write nothing it guards)."""
    rd = RunDir.from_cfg(cfg)
    out_dir = _output_and_upstream(cfg, rd, stage, variant)[0] if is_rank_zero() else None
    if out_dir is None:
        yield
        return
    with output_lock(rd.root, out_dir):
        remove_leftovers(out_dir)
        yield


def _output_and_upstream(cfg: DictConfig, rd: RunDir, stage: str, variant: str | None):
    """Where a stage wrote, its variant label, and (stage, variant) of the stage it consumed."""
    if REGISTRY[stage].output is None:
        return None, None, None
    provider = rd.provider(stage)
    upstream = (provider, None) if provider else None
    if stage == quantize.STAGE:
        variant = variant or quantize.output_name(cfg)
    elif stage == export.STAGE:
        variant = variant or export.export_name(cfg, rd)
        hf = str(cfg.export.format) == "hf"
        upstream = (provider, export.quantize_input(cfg, rd).name) if hf else (sft.STAGE, None)
    return rd.output(stage, variant), variant, upstream
