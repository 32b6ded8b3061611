"""The `quant` and `calib` config groups: the ModelOpt format a quantize stage applies and its calibration loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from dg_pipeline.core.errors import InputError
from dg_pipeline.settings.checks import check_choice, check_number, check_positive_int

QUANT_FORMATS = ("fp8", "nvfp4", "nvfp4_experts_only")  # one conf/quant/<name>.yaml each
KV_CACHE_MODES = ("none", "fp8", "fp8_cast")
NVFP4_BACKENDS = ("auto", "emulated", "modelopt")
FP8_GEMM_CHOICES = ("auto", "false")
CALIB_MODES = ("diffusion", "text")  # one conf/calib/<mode>.yaml each


@dataclass
class QuantSettings:
    """conf/quant/*.yaml (fp8.yaml documents every key)."""

    name: str = "fp8"
    kv_cache: str = "none"
    max_accuracy_drop: Optional[float] = None  # the quantize gate's allowance when verify.max_accuracy_drop is null
    max_logits_error: Optional[float] = None  # bound on quant.json logits_relative_error (null = not checked)
    formats: List[str] = field(default_factory=lambda: ["fp8", "nvfp4"])  # what stage=all quantizes
    self_conditioning: bool = False
    exclude: List[str] = field(default_factory=list)
    nvfp4_backend: str = "auto"
    fp8_gemm: str = "auto"
    probe_prompts: int = 8

    def __post_init__(self) -> None:
        self.fp8_gemm = self.fp8_gemm.lower()  # YAML `false` arrives as a bool, stored as "False"
        check_choice("quant.name", self.name, QUANT_FORMATS, " (conf/quant/<name>.yaml)")
        check_choice("quant.kv_cache", self.kv_cache, KV_CACHE_MODES)
        check_number("quant.max_accuracy_drop", self.max_accuracy_drop, low=0.0, optional=True)
        check_number("quant.max_logits_error", self.max_logits_error, low=0.0, low_inclusive=False, optional=True)
        for fmt in self.formats:
            if fmt not in QUANT_FORMATS:
                raise InputError(f"quant.formats contains '{fmt}': no conf/quant/{fmt}.yaml; choose from "
                                 f"{sorted(QUANT_FORMATS)}")
        check_choice("quant.nvfp4_backend", self.nvfp4_backend, NVFP4_BACKENDS)
        if self.fp8_gemm not in FP8_GEMM_CHOICES:
            raise InputError(f"quant.fp8_gemm={self.fp8_gemm}: choose auto (real FP8 GEMMs where supported) or false")
        check_positive_int("quant.probe_prompts", self.probe_prompts)


@dataclass
class CalibSettings:
    """conf/calib/*.yaml (diffusion.yaml documents every key)."""

    mode: str = "diffusion"
    n_samples: int = 128
    batch_size: int = 16
    max_length: int = 512
    max_new_tokens: Optional[int] = None  # null = sampler.max_new_tokens, else the task's answer length
    seed: Optional[int] = None  # null = the run's seed

    def __post_init__(self) -> None:
        check_choice("calib.mode", self.mode, CALIB_MODES, " (conf/calib/<mode>.yaml)")
        check_positive_int("calib.n_samples", self.n_samples, "a positive number of prompts")
        check_positive_int("calib.batch_size", self.batch_size, "a positive number of prompts")
        check_positive_int("calib.max_length", self.max_length, "a positive number of tokens")
        check_positive_int("calib.max_new_tokens", self.max_new_tokens, "a positive number of tokens", optional=True)

    def output_name(self, quant_name: str) -> str:
        """<quant> for the default diffusion calibration, <quant>-<mode> otherwise (a comparison run does not
        overwrite the output export reads)."""
        return quant_name if self.mode == "diffusion" else f"{quant_name}-{self.mode}"
