"""The Lightning Trainer wired through NeMo's exp_manager, and `fit`: the one call a training stage makes.

exp_manager owns the experiment dir <run_dir>/<stage>/exp (explicit_log_dir): checkpoints (top-1 by val/loss +
last), the W&B logger (offline by default, files under <run_dir>/wandb), EMA (trainer.ema) and step timing. A
restarted run (trainer.resume_if_exists) resumes from the newest complete checkpoint (training/checkpoints.py), with
the data order at the next unseen batch (data/order.py) and each example's noise keyed by its index and epoch: the
same losses and weights as a run that was never interrupted. Scale-out only through Lightning strategies:
trainer.devices / num_nodes / strategy = auto | ddp | fsdp (FSDP2 through Lightning's ModelParallelStrategy over
every rank; the module shards itself in configure_model, dg_pipeline.training.sharding).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from dg_pipeline.core.errors import InputError
from dg_pipeline.core.io import atomic_write_json
from dg_pipeline.core.ranks import global_rank, on_rank_zero, pinned_run_dir
from dg_pipeline.data.collate import Collator, ExampleDataset
from dg_pipeline.data.order import GlobalBatchSampler, ResumableLoader
from dg_pipeline.training.callbacks import TokensPerSecond, progress_bar
from dg_pipeline.objective import build_objective
from dg_pipeline.training.checkpoints import newest_complete_checkpoint, recover_checkpoints
from dg_pipeline.training.lora import apply_lora, merge_lora
from dg_pipeline.training.module import (
    BlockDiffusionModule,
    OptimConfig,
    freeze_router,
    freeze_vision,
)
from dg_pipeline.training.sharding import ParallelSettings, is_sharded

EXP_DIR_NAME = "exp"
CHECKPOINT_MONITOR = "val/loss"
FINGERPRINT_FILE = "dg_fingerprint.json"
# Bumped when the checkpoint contents change (module structure, data-order state): older ones are not resumed.
CHECKPOINT_FORMAT = 2


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
                 seed: int) -> tuple[ResumableLoader, DataLoader | None]:
    """The training loader (a new seeded permutation per epoch, split into global batches across ranks, resumable
    mid-epoch) and an ordered validation loader split the same way, over lists of `Example`s."""
    if len(train_examples) == 0:
        raise InputError("the training split is empty: check data.n_train / data.train_path")
    collate_fn = Collator(canvas_length=canvas_length, pad_id=pad_id)
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
    """cfg.device (cpu | cuda | auto) wins over trainer.accelerator when it names a device."""
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
    name = ParallelSettings.from_trainer_cfg(trainer_cfg).strategy
    if name == "auto":
        return "auto"
    if name == "ddp":
        # The encoder-only objective never runs the decoder's self-conditioning block. No buffer broadcast: DDP
        # matches buffers across ranks by position, and the rotary module registers its per-layer-type buffers in
        # `set` order, which differs between processes (string hashing), so rank 0's sliding-window frequencies
        # would overwrite another rank's full-attention ones. The buffers are constants, equal on every rank.
        return DDPStrategy(find_unused_parameters=ar_only, broadcast_buffers=False)
    return FullyShardedDataParallel()


def exp_manager_config(cfg: DictConfig, stage: str, exp_dir: Path, max_steps: int,
                       resume_from: Path | None = None) -> dict:
    """exp_manager's keys (nemo.utils.exp_manager.ExpManagerConfig) for one stage's experiment dir; `resume_from`:
    the checkpoint to resume (chosen by training/checkpoints.py, not by exp_manager's own search)."""
    run_dir = Path(str(cfg.run_dir)).expanduser().resolve()
    trainer_cfg, logger_cfg = cfg.trainer, cfg.logger
    wandb_mode = str(logger_cfg.mode)
    if wandb_mode not in ("offline", "online", "disabled"):
        raise InputError(f"logger.mode={wandb_mode}: choose offline, online or disabled")
    wandb_kwargs = {
        "name": stage,
        "project": str(logger_cfg.project),
        "entity": logger_cfg.get("entity"),
        "save_dir": str(run_dir),  # W&B writes <run_dir>/wandb/<offline-run-...>; `wandb sync` uploads it
        "offline": wandb_mode == "offline",
        "group": run_dir.name,
        "job_type": stage,
        "log_model": False,
    }
    return {
        "explicit_log_dir": str(exp_dir),
        "resume_if_exists": False,
        "resume_from_checkpoint": str(resume_from) if resume_from else None,
        "resume_ignore_no_checkpoint": True,  # a first run has nothing to resume
        "create_tensorboard_logger": False,
        "create_wandb_logger": wandb_mode != "disabled",
        "wandb_logger_kwargs": wandb_kwargs,
        "create_checkpoint_callback": True,
        "checkpoint_callback_params": {
            "monitor": CHECKPOINT_MONITOR,
            "mode": "min",
            "save_top_k": 1,
            "save_last": True,
            # No metric name in the file name: "val/loss" would become a sub-directory.
            "filename": f"{stage}-{{step}}",
            "auto_insert_metric_name": False,
            "always_save_nemo": False,
            "save_nemo_on_train_end": False,
            "save_best_model": False,
        },
        "ema": {"enable": bool(trainer_cfg.ema.enable), "decay": float(trainer_cfg.ema.decay)},
        "log_step_timing": True,
        "log_tflops_per_sec_per_gpu": False,
        "create_preemption_callback": True,
    }


def build_trainer(cfg: DictConfig, stage: str, stage_dir: Path, max_steps: int, ar_only: bool = False,
                  resume_from: Path | None = None) -> tuple[pl.Trainer, TokensPerSecond]:
    """A Lightning Trainer for `max_steps` optimiser steps, wired through exp_manager under <stage_dir>/exp."""
    from nemo.utils.exp_manager import exp_manager

    trainer_cfg = cfg.trainer
    throughput = TokensPerSecond()
    val_every = max(1, min(int(trainer_cfg.val_check_interval), max_steps))
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator=resolve_accelerator(trainer_cfg, cfg.get("device")),
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
        callbacks=[throughput, *progress_bar(str(trainer_cfg.get("progress_bar", "tqdm")))],
        enable_progress_bar=str(trainer_cfg.get("progress_bar", "tqdm")) != "none",
        enable_model_summary=False,
        logger=False,  # exp_manager attaches the W&B logger
        enable_checkpointing=False,  # exp_manager attaches its checkpoint callback
        # The loaders split global batches across ranks themselves (data/order.py), seeded and resumable.
        use_distributed_sampler=False,
        default_root_dir=str(stage_dir),
    )
    exp_manager(trainer, exp_manager_config(cfg, stage, stage_dir / EXP_DIR_NAME, max_steps, resume_from))
    for logger in trainer.loggers:
        # Here, not in exp_manager's kwargs: exp_manager would hand W&B an OmegaConf object it cannot serialise.
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return trainer, throughput


def _metric(metrics: dict, key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


# trainer keys that say where and how fast a run computes, not what: a checkpoint resumes across a change of them
# (sharded checkpoints load on any number of ranks). What decides the math is the global batch,
# trainer.batch_size x ranks: with it kept, the data order and the noise continue exactly.
PLACEMENT_KEYS = ("devices", "num_nodes", "accelerator", "num_workers", "progress_bar", "log_every_n_steps",
                  "activation_checkpointing", "expert_parallel", "resume_if_exists", "batch_size")


def training_fingerprint(cfg: DictConfig, stage: str, input_dir: Path | str) -> str:
    """What decides a training run: a checkpoint in <stage>/exp is resumed only by a run with the same one."""
    keys = {k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg.get(k), DictConfig) else cfg.get(k)
            for k in ("model", "data", "objective", "trainer", "seed")}
    keys["trainer"] = {k: v for k, v in keys["trainer"].items() if k not in PLACEMENT_KEYS}
    keys["trainer"]["global_batch"] = int(cfg.trainer.batch_size) * ParallelSettings.from_trainer_cfg(
        cfg.trainer).world_size()
    blob = json.dumps({"stage": stage, "input": str(input_dir), "format": CHECKPOINT_FORMAT, **keys},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_exp_dir(exp_dir: Path, fingerprint: str, resume: bool) -> None:
    """Keep <stage>/exp for resuming only when allowed and written by the same training run; else start fresh.
    (Rank 0 only: `fit` calls it through `on_rank_zero`.)"""
    # Beside the checkpoints: exp_manager moves the other files of a resumed log dir into run_<n>/.
    marker = exp_dir / "checkpoints" / FINGERPRINT_FILE
    same_run = marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint
    if exp_dir.exists() and not (resume and same_run):
        shutil.rmtree(exp_dir)
    atomic_write_json(marker, {"fingerprint": fingerprint})


def fit(module: BlockDiffusionModule, train_loader: DataLoader, val_loader: DataLoader | None, cfg: DictConfig,
        stage: str, stage_dir: Path, max_steps: int, fingerprint: str = "", resume: bool = True
        ) -> tuple[TrainingResult, pl.Trainer]:
    """Train `module` for `max_steps` steps, resuming from the newest complete checkpoint in <stage_dir>/exp when
    trainer.resume_if_exists and `resume` allow it and the experiment there has the same `fingerprint`; then
    validate the final weights once more. Returns the figures and the trainer (for `final_state_dict`)."""
    if max_steps <= 0:
        raise InputError(f"stage={stage}: max_steps={max_steps}; set trainer.max_steps (or trainer.pretrain_steps) > 0")
    stage_dir = Path(stage_dir)
    exp_dir = stage_dir / EXP_DIR_NAME
    resume = resume and bool(cfg.trainer.resume_if_exists)

    def prepare() -> None:
        prepare_exp_dir(exp_dir, fingerprint, resume)
        recover_checkpoints(exp_dir / "checkpoints", say=lambda line: print(f"{stage}: {line}"))

    on_rank_zero(prepare, f"{stage}: preparing {exp_dir}")
    resume_point = newest_complete_checkpoint(exp_dir / "checkpoints") if resume else None
    if resume_point is not None and global_rank() == 0:
        print(f"{stage}: resuming from {resume_point.path} (step {resume_point.step})")
    trainer, throughput = build_trainer(cfg, stage, stage_dir, max_steps, ar_only=not module.objective.has_diffusion,
                                        resume_from=resume_point.path if resume_point else None)
    resumed_from = trainer.ckpt_path
    started = time.perf_counter()
    # ckpt_path explicitly: it also stops the final `validate` from reloading a checkpoint. The run dir is pinned
    # for the ranks Lightning launches inside `fit`.
    with pinned_run_dir(str(cfg.run_dir)):
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=resumed_from)
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


def check_sharding_options(cfg: DictConfig, parallel: ParallelSettings) -> None:
    """Options that do not combine with FSDP here, refused before any work."""
    if parallel.strategy != "fsdp":
        return
    if bool(cfg.trainer.lora.enabled):
        raise InputError("trainer.lora.enabled=true with trainer.strategy=fsdp: LoRA adapters are not sharded; train "
                         "LoRA with trainer.strategy=ddp (the base weights are frozen) or full weights with fsdp")
    if bool(cfg.trainer.ema.enable):
        raise InputError("trainer.ema.enable=true with trainer.strategy=fsdp: NeMo's EMA keeps an unsharded copy of "
                         "the weights; use trainer.strategy=ddp for EMA, or turn it off")


def train(cfg: DictConfig, model, tokenizer, splits, stage: str, stage_dir: Path, max_steps: int,
          input_dir: Path | str, ar_only: bool = False, resume: bool = True
          ) -> tuple[object | None, TrainingResult, pl.Trainer]:
    """Everything between a loaded model and the model to save: freeze the router (objective.freeze_router) and
    the vision tower, LoRA (trainer.lora), the objective, the loaders, `fit`, EMA weights, LoRA merge.

    Under trainer.strategy=fsdp `model` may be on the meta device: each rank then loads only its shards from
    `input_dir` once the model is sharded, and the final weights are gathered to rank 0 (every rank takes part).

    Returns (plain DiffusionGemmaForBlockDiffusion with the final weights, or None on the ranks > 0 of a sharded
    run; figures; trainer).
    """
    parallel = ParallelSettings.from_trainer_cfg(cfg.trainer)
    check_sharding_options(cfg, parallel)
    objective = build_objective(cfg.objective, tokenizer, ar_only=ar_only)
    if bool(cfg.objective.get("freeze_router", True)):
        freeze_router(model)
    freeze_vision(model)
    lora_cfg = cfg.trainer.lora
    peft_model = apply_lora(model, lora_cfg) if bool(lora_cfg.enabled) else None
    on_meta = any(p.is_meta for p in model.parameters())
    module = BlockDiffusionModule(model, objective, OptimConfig.from_trainer_cfg(cfg.trainer, max_steps),
                                  seed=int(cfg.seed), parallel=parallel, weights_dir=input_dir if on_meta else None)
    train_loader, val_loader = make_loaders(splits.train, splits.val, cfg.trainer, model.config.canvas_length,
                                            tokenizer.pad_token_id, seed=int(cfg.seed))
    fingerprint = training_fingerprint(cfg, stage, input_dir)
    result, trainer = fit(module, train_loader, val_loader, cfg, stage, stage_dir, max_steps, fingerprint, resume)
    if is_sharded(module.network):
        from dg_pipeline.model.io import resolve_dtype
        from dg_pipeline.model.sharded_io import gather_model

        dtype = resolve_dtype(str(cfg.model.get("dtype", "float32")))
        return gather_model(module.model, dtype, is_rank_zero=trainer.is_global_zero), result, trainer
    ema_state = final_state_dict(trainer, model)
    if ema_state is not None:
        model.load_state_dict(ema_state)
    if peft_model is not None:
        model = merge_lora(peft_model, list(lora_cfg.target_modules))
    return model, result, trainer
