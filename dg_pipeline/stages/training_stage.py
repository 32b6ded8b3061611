"""What the two training stages share (stage `pretrain`: the encoder AR loss only; stage `sft`: block diffusion):
load the input model, train it (dg_pipeline.training.train), save it, record the figures, run the gate. Not a stage
itself: stages/sft.py and stages/pretrain.py wire it.

Every rank trains; under trainer.strategy=fsdp each rank builds the model on the meta device and loads only its
shards. Rank 0 generates the data (the others then read it), saves the model and runs the gate while the others
wait (dg_pipeline.core.ranks).
"""

from __future__ import annotations

import time

from omegaconf import DictConfig
from rich.console import Console

from dg_pipeline.core import RunDir, atomic_write_json
from dg_pipeline.core.fingerprint import stage_fingerprint_parts
from dg_pipeline.core.ranks import on_rank_zero, rank_zero_first
from dg_pipeline.core.registry import reuse_beside_gate
from dg_pipeline.data.sources import load_splits
from dg_pipeline.model.io import (load_model, load_model_skeleton, resolve_device, resolve_dtype, save_model,
                                  stop_token_ids)
from dg_pipeline.settings import RunSettings
from dg_pipeline.settings.sampler import generation_config as sampler_generation_config
from dg_pipeline.training import TrainingJob, train
from dg_pipeline.verify import GateSettings, read_gate_record, run_gate
from dg_pipeline.verify.record import VERIFY_JSON
from dg_pipeline.verify.step_choice import StepChoice, choose_denoising_steps

TRAINING_JSON = "training.json"

console = Console()


def run_training_stage(cfg: DictConfig, stage: str, max_steps: int, ar_only: bool, choose_steps: bool) -> dict:
    """Load the input model, train it (dg_pipeline.training.train), save it, record the figures, run the gate.
    `choose_steps`: set generation_config.json's max_denoising_steps from the val curve (sft)."""
    settings = RunSettings.from_cfg(cfg)
    rundir = RunDir.from_cfg(cfg)
    stage_dir, model_dir = rundir.stage(stage), rundir.output(stage)
    input_dir = rundir.resolve_input(stage, settings.input)  # sft: pretrain's model when it ran, else base's
    fingerprint = stage_fingerprint_parts(cfg, stage, input_dir)
    previous = read_gate_record(stage_dir / VERIFY_JSON)
    reuse = reuse_beside_gate(stage, model_dir, previous, fingerprint, force=settings.force)
    if reuse.skip:
        console.print(f"[bold]{stage}[/]: skipped, {reuse.reason} (force=true retrains)")
        return {**previous, "skipped": True}
    if model_dir.exists() and not settings.force:
        console.print(f"[bold]{stage}[/]: training again: {reuse.reason}")

    device = resolve_device(settings.device)
    if settings.trainer.strategy == "fsdp":
        model, tokenizer = load_model_skeleton(input_dir)  # no weights yet: each rank loads its shards
    else:
        # FP32 master weights whatever model.dtype says; trainer.precision decides the compute dtype. The input's
        # tokenizer is checked against the one its model was saved with (load_model), before any training.
        model, tokenizer = load_model(input_dir, dtype="float32", device="cpu")
    with rank_zero_first(f"{stage}: generating the data"):
        splits = load_splits(settings.data, tokenizer, rundir, seed=settings.seed,
                             eos_token_ids=stop_token_ids(model))  # an empty eval file fails here
    objective = "ar" if ar_only else settings.objective.name
    console.print(f"[bold]{stage}[/]: {input_dir} -> {model_dir}; {len(splits.train)} train / {len(splits.val)} val "
                  f"examples, {max_steps} steps, objective={objective}")
    started = time.perf_counter()
    # force=true always starts clean; otherwise an interrupted run with the same settings resumes.
    job = TrainingJob.for_run(settings, stage, stage_dir, max_steps, input_dir, ar_only=ar_only,
                              resume=not settings.force)
    model, result, _ = train(job, model, tokenizer, splits)

    def save_and_verify() -> dict:
        trained = model.to(device=device, dtype=resolve_dtype(settings.model.dtype)).eval()
        gate = GateSettings.for_run(settings)
        choice = choose_step_budget(settings, gate, trained, tokenizer, splits.val) if choose_steps else None
        for stale in (VERIFY_JSON, TRAINING_JSON):  # a gate record only ever describes the model beside it
            (stage_dir / stale).unlink(missing_ok=True)
        # The trained model carries the run's sampler settings (recipe sampler.* keys, the chosen step budget), as an
        # export's generation_config.json does: vLLM, generate() and every later gate run it as this gate did.
        save_model(trained, tokenizer, model_dir, generation_config=sampler_generation_config(
            tokenizer, base=trained.generation_config, model_config=trained.config,
            **settings.sampler.generation_overrides()))
        figures = {
            "stage": stage,
            "input": str(input_dir),
            "objective": objective,
            "lora": settings.trainer.lora.enabled,
            **result.to_dict(),
            "train_examples": len(splits.train),
            "val_examples": len(splits.val),
            "stage_seconds": time.perf_counter() - started,
        }
        atomic_write_json(stage_dir / TRAINING_JSON, figures)
        _print_figures(figures)
        return run_gate(trained, tokenizer, splits.gate_examples(), gate, stage=stage, input_dir=input_dir,
                        out_dir=stage_dir,
                        extra={"training": figures, "step_choice": choice.to_dict() if choice else None,
                               "fingerprint": fingerprint})

    # Rank 0 saves and verifies while the other ranks wait (and fail with it if it fails).
    return on_rank_zero(save_and_verify, f"stage {stage}: saving {model_dir} and its gate") or {}


def choose_step_budget(settings: RunSettings, gate: GateSettings, model, tokenizer, val_examples) -> StepChoice | None:
    """With verify.choose_steps (and no explicit sampler.max_denoising_steps): set the model's generation_config
    max_denoising_steps from the val split's step curve (dg_pipeline.verify.step_choice)."""
    if not settings.verify.choose_steps or settings.sampler.max_denoising_steps is not None:
        return None
    choice = choose_denoising_steps(model, tokenizer, val_examples, gate, split="val", console=console)
    if choice is not None:
        model.generation_config.max_denoising_steps = choice.max_denoising_steps
    return choice


def _print_figures(figures: dict) -> None:
    def fmt(key):
        value = figures.get(key)
        return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    console.print(
        f"[bold]{figures['stage']}[/]: {fmt('steps')} steps in {fmt('wall_seconds')} s, "
        f"{fmt('tokens_per_second')} tokens/s; train loss {fmt('final_train_loss')}, val loss {fmt('val_loss')}, "
        f"val acc t=1 {fmt('val_acc_t1')}, t=0.5 {fmt('val_acc_t05')}"
    )
