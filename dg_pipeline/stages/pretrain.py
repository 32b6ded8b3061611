"""Stage `pretrain`: the shared weights trained as a causal LM only (the encoder AR loss; no decoder pass), for
trainer.pretrain_steps steps on the recipe's data.

input=<dir>, else <run_dir>/base/model -> <run_dir>/pretrain/model/ (+ training.json, verify.json, exp/), which
stage=sft then starts from. Skipped when the output exists, unless force=true.
"""

from __future__ import annotations

from omegaconf import DictConfig

from dg_pipeline.core.errors import InputError
from dg_pipeline.settings import RunSettings
from dg_pipeline.stages.training_stage import run_training_stage

STAGE = "pretrain"


def run(cfg: DictConfig) -> dict:
    steps = RunSettings.from_cfg(cfg).trainer.pretrain_steps
    if steps <= 0:
        raise InputError(f"trainer.pretrain_steps={steps}: stage=pretrain needs a positive number of steps "
                         f"(e.g. trainer.pretrain_steps=200)")
    return run_training_stage(cfg, STAGE, max_steps=steps, ar_only=True, choose_steps=False)
