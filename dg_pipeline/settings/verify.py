"""The `verify` config group: the gate every stage ends with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from dg_pipeline.core.errors import InputError
from dg_pipeline.settings.checks import check_number, check_positive_int


@dataclass
class VerifySettings:
    """conf/verify/default.yaml (documents every key)."""

    n_eval: Optional[int] = None  # per eval source; null = data.n_eval (or the whole eval file)
    batch_size: int = 16
    speed_examples: int = 8  # per timing round
    speed_rounds: int = 5
    speed_confidence: float = 0.95
    fixed_steps_benchmark: Optional[int] = 16  # null = off
    min_accuracy: float = 0.0
    max_accuracy_drop: Optional[float] = None  # null = the stage's own allowance (quant/export), else no drop check
    drop_confidence: float = 0.95
    min_speedup: float = 0.0
    reference: Optional[str] = None
    ar_baseline: bool = True
    time_simulated: bool = False  # quantize gates: also decode AR and time on fake-quantized weights
    sweep_steps: List[int] = field(default_factory=lambda: [1, 2, 3, 4, 6])
    sweep_examples: Optional[int] = 64  # per eval source; null = all
    choose_steps: bool = True  # stage=sft: max_denoising_steps in generation_config.json from the val curve
    choose_steps_max_loss: float = 0.005
    plots: bool = True
    allow_flat_metric: bool = False  # pass a gate whose drop check cannot fail (reference accuracy 0); recorded

    def __post_init__(self) -> None:
        if self.n_eval is not None:
            check_positive_int("verify.n_eval", self.n_eval, "a positive number of examples (or null = data.n_eval)")
        check_positive_int("verify.batch_size", self.batch_size)
        check_positive_int("verify.speed_examples", self.speed_examples)
        check_positive_int("verify.speed_rounds", self.speed_rounds)
        if not 0.0 <= self.speed_confidence < 1.0:
            raise InputError(f"verify.speed_confidence={self.speed_confidence}: must be in [0, 1) (0 = check the median)")
        # The minimum of n rounds bounds their median at 1 - 2^-n: fewer rounds cannot give the confidence asked for.
        if self.speed_confidence and 1.0 - 0.5**self.speed_rounds < self.speed_confidence:
            raise InputError(
                f"verify.speed_rounds={self.speed_rounds} is too few for verify.speed_confidence={self.speed_confidence}"
                f" (the minimum of {self.speed_rounds} rounds bounds the median at "
                f"{1.0 - 0.5**self.speed_rounds:.3f}); raise speed_rounds or set speed_confidence=0 (check the median)"
            )
        check_positive_int("verify.fixed_steps_benchmark", self.fixed_steps_benchmark,
                           "a positive number of denoising steps (or null = off)", optional=True)
        if not 0.0 <= self.min_accuracy <= 1.0:
            raise InputError(f"verify.min_accuracy={self.min_accuracy}: must be a fraction in [0, 1]")
        check_number("verify.max_accuracy_drop", self.max_accuracy_drop, low=0.0, optional=True)
        if not 0.0 <= self.drop_confidence < 1.0:
            raise InputError(f"verify.drop_confidence={self.drop_confidence}: must be in [0, 1) (0 = raw drop)")
        check_number("verify.min_speedup", self.min_speedup, low=0.0)
        if self.min_speedup > 0 and not self.ar_baseline:
            raise InputError(f"verify.min_speedup={self.min_speedup} needs the AR baseline: set "
                             "verify.ar_baseline=true or verify.min_speedup=0")
        check_positive_int("verify.sweep_examples", self.sweep_examples, "a positive number of examples per source "
                           "(or null = all)", optional=True)
        check_number("verify.choose_steps_max_loss", self.choose_steps_max_loss, low=0.0, high=1.0)
        for steps in self.sweep_steps:
            if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
                raise InputError(f"verify.sweep_steps contains {steps!r}: each entry must be a positive step count")
