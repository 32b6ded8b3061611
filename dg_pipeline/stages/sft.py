"""Stage `sft`: block-diffusion fine-tuning (objective=uniform, DiffusionGemma's recipe; or objective=masked).

input=<dir>, else <run_dir>/pretrain/model when it exists, else <run_dir>/base/model
  -> <run_dir>/sft/model/         merged weights (LoRA folded in), tokenizer, generation_config.json
     <run_dir>/sft/training.json  final train loss, val loss, val acc t=1 / t=0.5, tokens/s, wall time
     <run_dir>/sft/verify.json    the gate (dg_pipeline.verify.run_gate), with the training figures
     <run_dir>/sft/exp/           exp_manager: checkpoints (a restarted identical run resumes), logs
Skipped when the output exists, unless force=true; a restarted run resumes from its last complete checkpoint
unless force=true (which always starts clean). `run_training_stage` is shared with stage `pretrain`.

Every rank trains; under trainer.strategy=fsdp each rank builds the model on the meta device and loads only its
shards. Rank 0 generates the data (the others then read it), saves the model and runs the gate while the others
wait (dg_pipeline.core.ranks).
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console

from dg_pipeline.core import RunDir, atomic_write_json, read_json
from dg_pipeline.core.ranks import on_rank_zero, rank_zero_first
from dg_pipeline.data.sources import load_splits
from dg_pipeline.model.io import load_model, load_model_skeleton, resolve_dtype, save_model
from dg_pipeline.stages.base import resolve_device
from dg_pipeline.training import train
from dg_pipeline.training.sharding import ParallelSettings
from dg_pipeline.verify import run_gate

STAGE = "sft"
TRAINING_JSON = "training.json"

console = Console()


def run(cfg: DictConfig) -> dict:
    return run_training_stage(cfg, STAGE, max_steps=int(cfg.trainer.max_steps), ar_only=False)


def stage_input(cfg: DictConfig, rundir: RunDir, stage: str) -> Path:
    """`input=`, else pretrain's model when it exists (sft only), else base's; a missing one names its stage."""
    pretrained = rundir.model_dir("pretrain")
    default = pretrained if stage == STAGE and pretrained.exists() else None
    return rundir.resolve_input(stage, cfg.get("input"), default=default)


def run_training_stage(cfg: DictConfig, stage: str, max_steps: int, ar_only: bool) -> dict:
    """Load the input model, train it (dg_pipeline.training.train), save it, record the figures, run the gate."""
    rundir = RunDir.from_cfg(cfg)
    stage_dir, model_dir = rundir.stage(stage), rundir.model_dir(stage)
    if model_dir.exists() and not cfg.get("force", False):
        console.print(f"[bold]{stage}[/]: skipped, {model_dir} exists (force=true retrains)")
        return {**_previous_record(stage_dir), "skipped": True}

    input_dir = stage_input(cfg, rundir, stage)
    device = resolve_device(str(cfg.get("device", "auto")))
    if ParallelSettings.from_trainer_cfg(cfg.trainer).strategy == "fsdp":
        model, tokenizer = load_model_skeleton(input_dir)  # no weights yet: each rank loads its shards
    else:
        # FP32 master weights whatever model.dtype says; trainer.precision decides the compute dtype.
        model, tokenizer = load_model(input_dir, dtype="float32", device="cpu")
    with rank_zero_first(f"{stage}: generating the data"):
        splits = load_splits(cfg.data, tokenizer, rundir, seed=int(cfg.seed))
    console.print(f"[bold]{stage}[/]: {input_dir} -> {model_dir}; {len(splits.train)} train / {len(splits.val)} val "
                  f"examples, {max_steps} steps, objective={'ar' if ar_only else cfg.objective.name}")

    started = time.perf_counter()
    # force=true always starts clean; otherwise an interrupted run with the same settings resumes.
    model, result, trainer = train(cfg, model, tokenizer, splits, stage, stage_dir, max_steps, input_dir,
                                   ar_only=ar_only, resume=not cfg.get("force", False))
    # Rank 0 saves and verifies while the other ranks wait (and fail with it if it fails).
    record = on_rank_zero(lambda: _save_and_verify(cfg, stage, model, tokenizer, splits, input_dir, stage_dir,
                                                   model_dir, result, device, ar_only, started),
                          f"stage {stage}: saving {model_dir} and its gate")
    return record or {}


def _save_and_verify(cfg, stage, model, tokenizer, splits, input_dir, stage_dir, model_dir, result, device,
                     ar_only, started) -> dict:
    model = model.to(device=device, dtype=resolve_dtype(str(cfg.model.get("dtype", "float32")))).eval()
    save_model(model, tokenizer, model_dir)
    figures = {
        "stage": stage,
        "input": str(input_dir),
        "objective": "ar" if ar_only else str(cfg.objective.name),
        "lora": bool(cfg.trainer.lora.enabled),
        **result.to_dict(),
        "train_examples": len(splits.train),
        "val_examples": len(splits.val),
        "stage_seconds": time.perf_counter() - started,
    }
    atomic_write_json(stage_dir / TRAINING_JSON, figures)
    _print_figures(figures)
    return run_gate(model, tokenizer, splits.eval, cfg, stage=stage, input_dir=input_dir, out_dir=stage_dir,
                    extra={"training": figures})


def _previous_record(stage_dir: Path) -> dict:
    for name in ("verify.json", TRAINING_JSON):
        if (stage_dir / name).is_file():
            return read_json(stage_dir / name)
    return {}


def _print_figures(figures: dict) -> None:
    def fmt(key):
        value = figures.get(key)
        return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    console.print(
        f"[bold]{figures['stage']}[/]: {fmt('steps')} steps in {fmt('wall_seconds')} s, "
        f"{fmt('tokens_per_second')} tokens/s; train loss {fmt('final_train_loss')}, val loss {fmt('val_loss')}, "
        f"val acc t=1 {fmt('val_acc_t1')}, t=0.5 {fmt('val_acc_t05')}"
    )
