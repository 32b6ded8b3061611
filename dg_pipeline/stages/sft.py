"""Stage `sft`: block-diffusion fine-tuning (objective=uniform, DiffusionGemma's recipe; or objective=masked).

input=<dir>, else <run_dir>/pretrain/model when it exists, else <run_dir>/base/model
  -> <run_dir>/sft/model/         merged weights (LoRA folded in), tokenizer, generation_config.json (its
                                  max_denoising_steps chosen from the val split's step curve: verify.choose_steps)
     <run_dir>/sft/training.json  final train loss, val loss, val acc t=1 / t=0.5, tokens/s, wall time
     <run_dir>/sft/verify.json    the gate (dg_pipeline.verify.run_gate), with the training figures
     <run_dir>/sft/exp/           exp_manager: checkpoints (a restarted identical run resumes), logs
Skipped when the model dir exists, its gate (verify.json) passed, and both were made with these settings on this
input (the fingerprint verify.json holds), unless force=true (which always starts training clean); otherwise it says
why it trains again, and an interrupted run with the same settings resumes from its last complete checkpoint.
Training, saving and the gate are shared with stage `pretrain` (stages/training_stage.py): every rank trains; rank 0
generates the data, saves the model and runs the gate while the others wait.
"""

from __future__ import annotations

from omegaconf import DictConfig

from dg_pipeline.settings import RunSettings
from dg_pipeline.stages.training_stage import run_training_stage

STAGE = "sft"


def run(cfg: DictConfig) -> dict:
    return run_training_stage(cfg, STAGE, max_steps=RunSettings.from_cfg(cfg).trainer.max_steps, ar_only=False,
                              choose_steps=True)
