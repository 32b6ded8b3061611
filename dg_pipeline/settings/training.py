"""The `objective`, `trainer` and `logger` config groups: what a training stage optimises, how, and where it logs."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, List, Optional

from dg_pipeline.core.errors import InputError
from dg_pipeline.settings.checks import check_choice, check_non_negative_int, check_number, check_positive_int

OBJECTIVES = ("uniform", "masked")
AR_LOSS_SCOPES = ("response", "sequence")  # objective.ar_loss_scope
FILL_TOKENS = ("pad", "eos")  # objective.fill_token
STRATEGIES = ("auto", "ddp", "fsdp")
# Lightning precision -> the dtype FSDP2 gathers parameters and computes in (None: the parameters' own, fp32).
COMPUTE_DTYPES = {"32-true": None, "32": None, "bf16-mixed": "bfloat16", "bf16-true": "bfloat16",
                  "16-mixed": "float16", "16-true": "float16"}
PROGRESS_BARS = ("tqdm", "none")
WANDB_MODES = ("offline", "online", "disabled")
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ObjectiveSettings:
    """conf/objective/*.yaml (uniform.yaml documents every key)."""

    name: str = "uniform"
    t_eps: float = 0.001
    ar_loss_weight: float = 1.0
    ar_loss_scope: str = "response"
    fill_token: str = "pad"
    self_conditioning_prob: float = 0.5
    freeze_router: bool = True
    supervise_padding: bool = True

    def __post_init__(self) -> None:
        check_choice("objective.name", self.name, OBJECTIVES)
        check_choice("objective.ar_loss_scope", self.ar_loss_scope, AR_LOSS_SCOPES)
        check_choice("objective.fill_token", self.fill_token, FILL_TOKENS)
        check_number("objective.t_eps", self.t_eps, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        check_number("objective.ar_loss_weight", self.ar_loss_weight, low=0.0)
        check_number("objective.self_conditioning_prob", self.self_conditioning_prob, low=0.0, high=1.0)


@dataclass
class LoraSettings:
    enabled: bool = False
    rank: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))

    def __post_init__(self) -> None:
        check_positive_int("trainer.lora.rank", self.rank)
        check_number("trainer.lora.dropout", self.dropout, low=0.0, high=1.0, high_inclusive=False)


@dataclass
class EmaSettings:
    enable: bool = False
    decay: float = 0.999

    def __post_init__(self) -> None:
        check_number("trainer.ema.decay", self.decay, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)


@dataclass(frozen=True)
class ParallelSettings:
    """The scale-out keys of the trainer group (conf/trainer/cpu.yaml documents them), as sharding and the memory
    planner read them (`TrainerSettings.parallel`)."""

    strategy: str = "auto"
    devices: Any = 1  # a count, "auto", or a list of device indices (Lightning's `devices`)
    num_nodes: int = 1
    precision: str = "32-true"
    activation_checkpointing: bool = False
    expert_parallel: int = 1

    def __post_init__(self) -> None:
        check_choice("trainer.strategy", self.strategy, STRATEGIES)
        check_choice("trainer.precision", self.precision, COMPUTE_DTYPES)
        check_positive_int("trainer.expert_parallel", self.expert_parallel,
                           "1 (off) or the number of ranks that split the experts")
        if self.expert_parallel > 1 and self.strategy != "fsdp":
            raise InputError(f"trainer.expert_parallel={self.expert_parallel} needs trainer.strategy=fsdp "
                             f"(here {self.strategy})")

    @property
    def compute_dtype(self):
        """The torch dtype of trainer.precision's compute (None in full precision)."""
        import torch

        name = COMPUTE_DTYPES[self.precision]
        return None if name is None else getattr(torch, name)

    def world_size(self, devices_per_node: int | None = None) -> int:
        """Ranks of the run: devices per node x nodes (`devices_per_node` when the caller resolved "auto")."""
        devices = devices_per_node if devices_per_node is not None else self.devices
        count = len(devices) if isinstance(devices, (list, tuple)) else int(devices) if devices != "auto" else 1
        return count * self.num_nodes


@dataclass
class TrainerSettings:
    """conf/trainer/*.yaml (cpu.yaml documents every key)."""

    max_steps: int = 1500
    pretrain_steps: int = 0
    batch_size: int = 16
    accumulate_grad_batches: int = 1
    lr: float = 5.0e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    betas: List[float] = field(default_factory=lambda: [0.95, 0.99])
    weight_decay: float = 1.0e-4
    gradient_clip_val: float = 1.0
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: Any = 1  # a count, "auto", or a list of device indices (Lightning's `devices`)
    num_nodes: int = 1
    strategy: str = "auto"
    activation_checkpointing: bool = False  # fsdp: recompute each text layer in backward
    expert_parallel: int = 1  # fsdp: 1, or the number of ranks that each own a share of the routed experts
    val_check_interval: int = 500
    log_every_n_steps: int = 10
    num_workers: int = 0
    progress_bar: str = "tqdm"
    ema: EmaSettings = field(default_factory=EmaSettings)
    resume_if_exists: bool = True
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        check_positive_int("trainer.max_steps", self.max_steps, "a positive number of optimiser steps")
        check_non_negative_int("trainer.pretrain_steps", self.pretrain_steps)
        for key in ("batch_size", "accumulate_grad_batches", "num_nodes", "val_check_interval", "log_every_n_steps"):
            check_positive_int(f"trainer.{key}", getattr(self, key))
        check_non_negative_int("trainer.warmup_steps", self.warmup_steps)
        check_non_negative_int("trainer.num_workers", self.num_workers)
        check_number("trainer.lr", self.lr, low=0.0, low_inclusive=False)
        check_number("trainer.min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        if len(self.betas) != 2:
            raise InputError(f"trainer.betas={list(self.betas)}: expected two numbers, e.g. [0.95, 0.99]")
        check_choice("trainer.progress_bar", self.progress_bar, PROGRESS_BARS)
        if self.parallel.strategy == "fsdp":  # (building `parallel` checks the scale-out keys together)
            # Options that do not combine with FSDP here, refused before any work.
            if self.lora.enabled:
                raise InputError("trainer.lora.enabled=true with trainer.strategy=fsdp: LoRA adapters are not "
                                 "sharded; train LoRA with trainer.strategy=ddp (the base weights are frozen) or full "
                                 "weights with fsdp")
            if self.ema.enable:
                raise InputError("trainer.ema.enable=true with trainer.strategy=fsdp: NeMo's EMA keeps an unsharded "
                                 "copy of the weights; use trainer.strategy=ddp for EMA, or turn it off")

    @property
    def parallel(self) -> ParallelSettings:
        """The scale-out keys, checked together."""
        return ParallelSettings(**{f.name: getattr(self, f.name) for f in fields(ParallelSettings)})


@dataclass
class LoggerSettings:
    """conf/logger/*.yaml: Weights & Biases (offline by default)."""

    mode: str = "offline"
    project: str = "dg_pipeline"
    entity: Optional[str] = None
    log_artifacts: bool = True

    def __post_init__(self) -> None:
        check_choice("logger.mode", self.mode, WANDB_MODES)
