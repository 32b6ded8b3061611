"""The Lightning Trainer wired through NeMo's exp_manager, and `fit`: the one call a training stage makes.

exp_manager owns the experiment dir <run_dir>/<stage>/exp (explicit_log_dir): checkpoints (top-1 by val/loss +
last), the W&B logger (offline by default, files under <run_dir>/wandb), EMA (trainer.ema) and step timing. A
restarted run (trainer.resume_if_exists) resumes from the newest complete checkpoint (training/checkpoints.py), with
the data order at the next unseen batch (data/order.py) and each example's noise keyed by its index and epoch: the
same losses and weights as a run that was never interrupted. Scale-out only through Lightning strategies:
trainer.devices / num_nodes / strategy = auto | ddp | fsdp (FSDP2 through Lightning's ModelParallelStrategy over
every rank; the module shards itself in configure_model, dg_pipeline.training.sharding).
A stage hands training a `TrainingJob`: the typed settings it reads and where it writes, never the Hydra config.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch.utils.data import DataLoader

from dg_pipeline.core.errors import InputError
from dg_pipeline.core.fingerprint import config_fingerprint
from dg_pipeline.core.io import atomic_write_json
from dg_pipeline.core.ranks import global_rank, on_rank_zero, pinned_run_dir
from dg_pipeline.data.collate import Collator, ExampleDataset
from dg_pipeline.data.order import GlobalBatchSampler, ResumableLoader
from dg_pipeline.training.callbacks import StopOnNonFinite, TokensPerSecond, progress_bar
from dg_pipeline.objective import build_objective, fill_token_id
from dg_pipeline.training.checkpoints import newest_complete_checkpoint, recover_checkpoints
from dg_pipeline.training.lora import apply_lora, merge_lora
from dg_pipeline.settings import LoggerSettings, ObjectiveSettings, RunSettings, TrainerSettings
from dg_pipeline.settings.training import STRATEGIES
from dg_pipeline.training.module import (
    BlockDiffusionModule,
    OptimConfig,
    freeze_router,
    freeze_vision,
)
from dg_pipeline.training.sharding import is_sharded

EXP_DIR_NAME = "exp"
CHECKPOINT_MONITOR = "val/loss"
FINGERPRINT_FILE = "dg_fingerprint.json"
# The config groups that decide a training run: <stage>/exp is resumed only by a run with the same ones.
RESUME_KEYS = ("model", "data", "objective", "trainer", "seed")
# Bumped when the checkpoint contents change (module structure, data-order state): older ones are not resumed.
CHECKPOINT_FORMAT = 2
# trainer keys that say where and how fast a run computes, not what: a checkpoint resumes across a change of them
# (sharded checkpoints load on any number of ranks). What decides the math is the global batch,
# trainer.batch_size x ranks: with it kept, the data order and the noise continue exactly.
PLACEMENT_KEYS = ("devices", "num_nodes", "accelerator", "num_workers", "progress_bar", "log_every_n_steps",
                  "activation_checkpointing", "expert_parallel", "resume_if_exists", "batch_size")


def training_fingerprint(settings: RunSettings, stage: str, input_dir: Path | str) -> str:
    """What decides a training run (RESUME_KEYS, less PLACEMENT_KEYS, plus the global batch): a checkpoint in
    <stage>/exp is resumed only by a run with the same one."""
    values = {k: getattr(settings, k) for k in RESUME_KEYS}
    values = {k: asdict(v) if is_dataclass(v) else v for k, v in values.items()}
    values["trainer"] = {k: v for k, v in values["trainer"].items() if k not in PLACEMENT_KEYS}
    values["trainer"]["global_batch"] = settings.trainer.batch_size * settings.trainer.parallel.world_size()
    return config_fingerprint(values, RESUME_KEYS, f"{stage}:{input_dir}:format {CHECKPOINT_FORMAT}")


@dataclass(frozen=True)
class TrainingJob:
    """What a training stage asks of `train`: the settings it reads and where it writes."""

    stage: str
    stage_dir: Path
    max_steps: int
    trainer: TrainerSettings
    objective: ObjectiveSettings
    logger: LoggerSettings
    run_dir: Path
    seed: int = 0
    device: str | None = None  # cpu | cuda[:n] wins over trainer.accelerator; auto leaves it to the trainer
    hyperparams: Mapping[str, Any] = field(default_factory=dict)  # the run's settings, as W&B records them
    fingerprint: str = ""  # see training_fingerprint
    resume: bool = True  # False: start fresh even when <stage>/exp holds the same run (force=true)
    ar_only: bool = False  # the encoder-only objective (stage=pretrain)
    # The model dir training starts from: a model built on the meta device (trainer.strategy=fsdp) loads each
    # rank's shards from it.
    input_dir: Path | None = None
    dtype: str = "float32"  # model.dtype: a sharded model is gathered to rank 0 in it

    @classmethod
    def for_run(cls, settings: RunSettings, stage: str, stage_dir: Path, max_steps: int, input_dir: Path,
                **kwargs) -> "TrainingJob":
        kwargs.setdefault("fingerprint", training_fingerprint(settings, stage, input_dir))
        return cls(stage=stage, stage_dir=Path(stage_dir), max_steps=max_steps, trainer=settings.trainer,
                   objective=settings.objective, logger=settings.logger,
                   run_dir=Path(settings.run_dir).expanduser().resolve(), seed=settings.seed, device=settings.device,
                   hyperparams=asdict(settings), input_dir=Path(input_dir), dtype=settings.model.dtype, **kwargs)


@dataclass
class TrainingResult:
    """The training figures a stage records (training.json) next to its gate."""

    steps: int
    final_train_loss: float | None
    val_loss: float | None
    val_diffusion_loss: float | None
    val_ar_loss: float | None
    val_acc_t1: float | None
    val_acc_t05: float | None
    val_answer_acc_t1: float | None
    val_answer_acc_t05: float | None
    tokens_per_second: float
    wall_seconds: float
    exp_dir: str
    resumed_from: str | None

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- data loaders


def make_loaders(train_examples: Sequence, val_examples: Sequence, trainer_cfg, canvas_length: int, pad_id: int,
                 seed: int, fill_id: int | None = None) -> tuple[ResumableLoader, DataLoader | None]:
    """The training loader (a new seeded permutation per epoch, split into global batches across ranks, resumable
    mid-epoch) and an ordered validation loader split the same way, over lists of `Example`s; `fill_id` fills the
    last block after EOS (None = pad_id)."""
    if len(train_examples) == 0:
        raise InputError("the training split is empty: check data.n_train / data.train_path")
    collate_fn = Collator(canvas_length=canvas_length, pad_id=pad_id, fill_id=fill_id)
    batch_size = int(trainer_cfg.batch_size)
    if batch_size <= 0:
        raise InputError(f"trainer.batch_size={batch_size}: must be a positive integer")
    workers = int(trainer_cfg.num_workers)
    order = GlobalBatchSampler(len(train_examples), batch_size, seed, shuffle=True, drop_last=True)
    train = ResumableLoader(ExampleDataset(train_examples), order, collate_fn, num_workers=workers)
    val = None
    if len(val_examples):
        val_order = GlobalBatchSampler(len(val_examples), batch_size, seed, shuffle=False, drop_last=False,
                                       keyed_by_epoch=False)
        val = DataLoader(ExampleDataset(val_examples), batch_size=batch_size, sampler=val_order,
                         collate_fn=collate_fn, num_workers=workers)
    return train, val


# ----------------------------------------------------------------------------------------------- trainer


def resolve_accelerator(trainer_cfg, device: str | None) -> str:
    """`device` (cpu | cuda | auto) wins over trainer.accelerator when it names a device."""
    if device == "cpu":
        return "cpu"
    if device and str(device).startswith("cuda"):
        return "gpu"
    return str(trainer_cfg.accelerator)


class FullyShardedDataParallel(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy with every rank data-parallel: FSDP2 over devices x nodes, no tensor
    parallelism. (Its "auto" data-parallel size is the node count, which fails on one node with several devices.)"""

    def __init__(self):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def resolve_strategy(trainer_cfg, ar_only: bool):
    """trainer.strategy: auto | ddp | fsdp, as Lightning strategy objects."""
    name = str(trainer_cfg.strategy)
    if name == "auto":
        return "auto"
    if name == "ddp":
        # The encoder-only objective never runs the decoder's self-conditioning block. No buffer broadcast: the
        # rotary buffers must stay each rank's own (BlockDiffusionModule lists them in DDP's ignore list).
        return DDPStrategy(find_unused_parameters=ar_only, broadcast_buffers=False)
    if name == "fsdp":
        return FullyShardedDataParallel()
    raise InputError(f"trainer.strategy={name}: choose one of {', '.join(STRATEGIES)}")


def exp_manager_config(job: TrainingJob, resume_from: Path | None = None) -> dict:
    """exp_manager's keys (nemo.utils.exp_manager.ExpManagerConfig) for one stage's experiment dir; `resume_from`:
    the checkpoint to resume (chosen by training/checkpoints.py, not by exp_manager's own search)."""
    run_dir, logger = job.run_dir, job.logger
    wandb_kwargs = {
        "name": job.stage,
        "project": logger.project,
        "entity": logger.entity,
        "save_dir": str(run_dir),  # W&B writes <run_dir>/wandb/<offline-run-...>; `wandb sync` uploads it
        "offline": logger.mode == "offline",
        "group": run_dir.name,
        "job_type": job.stage,
        "log_model": False,
    }
    return {
        "explicit_log_dir": str(job.stage_dir / EXP_DIR_NAME),
        "resume_if_exists": False,
        "resume_from_checkpoint": str(resume_from) if resume_from else None,
        "resume_ignore_no_checkpoint": True,  # a first run has nothing to resume
        "create_tensorboard_logger": False,
        "create_wandb_logger": logger.mode != "disabled",
        "wandb_logger_kwargs": wandb_kwargs,
        "create_checkpoint_callback": True,
        "checkpoint_callback_params": {
            "monitor": CHECKPOINT_MONITOR,
            "mode": "min",
            "save_top_k": 1,
            "save_last": True,
            # No metric name in the file name: "val/loss" would become a sub-directory.
            "filename": f"{job.stage}-{{step}}",
            "auto_insert_metric_name": False,
            "always_save_nemo": False,
            "save_nemo_on_train_end": False,
            "save_best_model": False,
        },
        "ema": {"enable": job.trainer.ema.enable, "decay": job.trainer.ema.decay},
        "log_step_timing": True,
        "log_tflops_per_sec_per_gpu": False,
        "create_preemption_callback": True,
    }


def build_trainer(job: TrainingJob, ar_only: bool = False, resume_from: Path | None = None
                  ) -> tuple[pl.Trainer, TokensPerSecond]:
    """A Lightning Trainer for `job.max_steps` optimiser steps, wired through exp_manager under <stage_dir>/exp."""
    from nemo.utils.exp_manager import exp_manager

    trainer_cfg = job.trainer
    throughput = TokensPerSecond()
    val_every = max(1, min(int(trainer_cfg.val_check_interval), job.max_steps))
    trainer = pl.Trainer(
        max_steps=job.max_steps,
        accelerator=resolve_accelerator(trainer_cfg, job.device),
        devices=trainer_cfg.devices,
        num_nodes=int(trainer_cfg.num_nodes),
        strategy=resolve_strategy(trainer_cfg, ar_only),
        precision=str(trainer_cfg.precision),
        gradient_clip_val=float(trainer_cfg.gradient_clip_val),
        accumulate_grad_batches=int(trainer_cfg.accumulate_grad_batches),
        # Validation every N optimiser steps across epochs (not tied to the epoch length).
        val_check_interval=val_every * int(trainer_cfg.accumulate_grad_batches),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=int(trainer_cfg.log_every_n_steps),
        callbacks=[throughput, StopOnNonFinite(job.stage, trainer_cfg.lr, trainer_cfg.precision),
                   *progress_bar(trainer_cfg.progress_bar)],
        enable_progress_bar=trainer_cfg.progress_bar != "none",
        enable_model_summary=False,
        logger=False,  # exp_manager attaches the W&B logger
        enable_checkpointing=False,  # exp_manager attaches its checkpoint callback
        # The loaders split global batches across ranks themselves (data/order.py), seeded and resumable.
        use_distributed_sampler=False,
        default_root_dir=str(job.stage_dir),
    )
    exp_manager(trainer, exp_manager_config(job, resume_from))
    for logger in trainer.loggers:
        # Here, not in exp_manager's kwargs: exp_manager would hand W&B an OmegaConf object it cannot serialise.
        logger.log_hyperparams(dict(job.hyperparams))
    return trainer, throughput


def _metric(metrics: dict, key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


def prepare_exp_dir(exp_dir: Path, fingerprint: str, resume: bool) -> None:
    """Keep <stage>/exp for resuming only when allowed and written by the same training run; else start fresh.
    (Rank 0 only: `fit` calls it through `on_rank_zero`.)"""
    # Beside the checkpoints: exp_manager moves the other files of a resumed log dir into run_<n>/.
    marker = exp_dir / "checkpoints" / FINGERPRINT_FILE
    same_run = marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint
    if exp_dir.exists() and not (resume and same_run):
        shutil.rmtree(exp_dir)
    atomic_write_json(marker, {"fingerprint": fingerprint})


def fit(module: BlockDiffusionModule, train_loader: DataLoader, val_loader: DataLoader | None, job: TrainingJob
        ) -> tuple[TrainingResult, pl.Trainer]:
    """Train `module` for `job.max_steps` steps, resuming from the newest complete checkpoint in <stage_dir>/exp
    when trainer.resume_if_exists and `job.resume` allow it and the experiment there has the same fingerprint; then
    validate the final weights once more. Returns the figures and the trainer (for `final_state_dict`)."""
    if job.max_steps <= 0:
        raise InputError(f"stage={job.stage}: max_steps={job.max_steps}; set trainer.max_steps (or "
                         "trainer.pretrain_steps) > 0")
    stage_dir = job.stage_dir
    exp_dir = stage_dir / EXP_DIR_NAME
    resume = job.resume and job.trainer.resume_if_exists

    def prepare() -> None:
        prepare_exp_dir(exp_dir, job.fingerprint, resume)
        recover_checkpoints(exp_dir / "checkpoints", say=lambda line: print(f"{job.stage}: {line}"))

    on_rank_zero(prepare, f"{job.stage}: preparing {exp_dir}")
    resume_point = newest_complete_checkpoint(exp_dir / "checkpoints") if resume else None
    if resume_point is not None and global_rank() == 0:
        print(f"{job.stage}: resuming from {resume_point.path} (step {resume_point.step})")
    trainer, throughput = build_trainer(job, ar_only=not module.objective.has_diffusion,
                                        resume_from=resume_point.path if resume_point else None)
    resumed_from = trainer.ckpt_path
    started = time.perf_counter()
    # ckpt_path explicitly: it also stops the final `validate` from reloading a checkpoint. The run dir is pinned
    # for the ranks Lightning launches inside `fit`.
    with pinned_run_dir(str(job.run_dir)):
        try:
            trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=resumed_from)
        except SystemExit:
            if trainer.interrupted:  # Lightning turns Ctrl-C into exit(1); the entry point reports it in one line
                raise KeyboardInterrupt from None
            raise
    wall = time.perf_counter() - started
    final_train_loss = _metric(trainer.callback_metrics, "train/loss")
    if final_train_loss is None:  # resumed from a checkpoint of the last step: nothing left to train
        final_train_loss = module.resumed_train_loss
    val_metrics = {}
    if val_loader is not None and module.last_validated_step == trainer.global_step:
        val_metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    elif val_loader is not None:
        # The schedule did not end on a validation: validate the final weights once more.
        val_metrics = trainer.validate(module, dataloaders=val_loader, verbose=False)[0]
    result = TrainingResult(
        steps=int(trainer.global_step),
        final_train_loss=final_train_loss,
        val_loss=_metric(val_metrics, "val/loss"),
        val_diffusion_loss=_metric(val_metrics, "val/diffusion_loss"),
        val_ar_loss=_metric(val_metrics, "val/ar_loss"),
        val_acc_t1=_metric(val_metrics, "val/acc_t1.0"),
        val_acc_t05=_metric(val_metrics, "val/acc_t0.5"),
        val_answer_acc_t1=_metric(val_metrics, "val/answer_acc_t1.0"),
        val_answer_acc_t05=_metric(val_metrics, "val/answer_acc_t0.5"),
        tokens_per_second=throughput.overall(),
        wall_seconds=wall,
        exp_dir=str(stage_dir / EXP_DIR_NAME),
        resumed_from=str(resumed_from) if resumed_from else None,
    )
    return result, trainer


def final_state_dict(trainer: pl.Trainer, model) -> dict | None:
    """The EMA weights to save (a copy), when trainer.ema.enable; None when the live weights are final."""
    from nemo.collections.common.callbacks import EMA

    ema = next((c for c in trainer.callbacks if isinstance(c, EMA)), None)
    if ema is None or not ema._ema_initialized(trainer):
        return None
    with ema.save_ema_model(trainer):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(job: TrainingJob, model, tokenizer, splits) -> tuple[object | None, TrainingResult, pl.Trainer]:
    """Everything between a loaded model and the model to save: freeze the router (objective.freeze_router) and
    the vision tower, LoRA (trainer.lora), the objective, the loaders, `fit`, EMA weights, LoRA merge.

    Under trainer.strategy=fsdp `model` may be on the meta device: each rank then loads only its shards from
    `input_dir` once the model is sharded, and the final weights are gathered to rank 0 (every rank takes part).

    Returns (plain DiffusionGemmaForBlockDiffusion with the final weights, or None on the ranks > 0 of a sharded
    run; figures; trainer).
    """
    parallel = job.trainer.parallel
    objective = build_objective(job.objective, tokenizer, ar_only=job.ar_only)
    if job.objective.freeze_router:
        freeze_router(model)
    freeze_vision(model)
    lora_cfg = job.trainer.lora
    peft_model = apply_lora(model, lora_cfg) if lora_cfg.enabled else None
    on_meta = any(p.is_meta for p in model.parameters())
    module = BlockDiffusionModule(model, objective, OptimConfig.from_trainer_cfg(job.trainer, job.max_steps),
                                  seed=job.seed, parallel=parallel, weights_dir=job.input_dir if on_meta else None)
    train_loader, val_loader = make_loaders(splits.train, splits.val, job.trainer, model.config.canvas_length,
                                            tokenizer.pad_token_id, seed=job.seed,
                                            fill_id=fill_token_id(job.objective, tokenizer))
    result, trainer = fit(module, train_loader, val_loader, job)
    if is_sharded(module.network):
        from dg_pipeline.model.io import resolve_dtype
        from dg_pipeline.model.sharded_io import gather_model

        return gather_model(module.model, resolve_dtype(job.dtype), is_rank_zero=trainer.is_global_zero), result, \
            trainer
    ema_state = final_state_dict(trainer, model)
    if ema_state is not None:
        model.load_state_dict(ema_state)
    if peft_model is not None:
        model = merge_lora(peft_model, list(lora_cfg.target_modules))
    return model, result, trainer
