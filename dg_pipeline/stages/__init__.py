"""One small module per stage; each only wires components together. `run_stage` dispatches on cfg.stage."""

from __future__ import annotations

import importlib

from omegaconf import DictConfig

from dg_pipeline.core.errors import InputError

STAGES = ("base", "pretrain", "sft", "eval", "quantize", "export", "check", "all")


def run_stage(cfg: DictConfig):
    stage = str(cfg.stage)
    if stage not in STAGES:
        raise InputError(f"stage={stage}: unknown stage; choose one of {', '.join(STAGES)}")
    module = importlib.import_module(f"dg_pipeline.stages.{stage}")
    return module.run(cfg)
