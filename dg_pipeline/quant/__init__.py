"""ModelOpt FP8 / NVFP4 post-training quantization of DiffusionGemma (see docs/ARCHITECTURE.md, quant).

recipes.py      the ModelOpt config per format (ModelOpt presets + the DiffusionGemma recipe), KV cache, exclusions
calibration.py  diffusion-aware and text forward loops, `calibrate` (mtq.quantize + sync + expert rule + audit)
experts.py      routed tokens per expert, the rule for experts that saw none
tied.py         one set of scales for the tied encoder/decoder quantizers
fused.py        one set of scales per fused q/k/v and gate/up group (as the engines run them)
nvfp4_cpu.py    NVFP4 fake quantization in torch, registered as a ModelOpt backend (CPU runs)
probe.py        logits relative error vs the unquantized model
fp8_gemm.py     real FP8 GEMMs (torch._scaled_mm) for the gate on Hopper+
state.py        save / restore the quantize stage's ModelOpt state; fold fake-quant weights for a fast gate

Importing this package registers the emulated NVFP4 backend, so `mto.restore` of a state that names it works.
"""

from dg_pipeline.quant.calibration import (
    CalibrationResult,
    audit_quantizers,
    calibrate,
    calibration_examples,
    calibration_forward_loop,
    diffusion_forward_loop,
    text_forward_loop,
)
from dg_pipeline.quant.experts import (
    ExpertTokenCounter,
    apply_uncovered_expert_rule,
    coverage_report,
    uncovered_summary,
)
from dg_pipeline.quant.fused import share_fused_scales
from dg_pipeline.quant.fp8_gemm import FP8Linear, fp8_gemm_supported, swap_in_fp8_gemms
from dg_pipeline.quant.nvfp4_cpu import NVFP4_BACKEND, fake_quant_nvfp4, register_nvfp4_backend
from dg_pipeline.quant.probe import LogitsErrorProbe, relative_l2
from dg_pipeline.quant.recipes import FORMATS, KV_CACHE_MODES, QuantRecipe, build_recipe
from dg_pipeline.quant.state import (
    QUANT_JSON,
    STATE_FILE,
    fold_weights_for_eval,
    read_quant_record,
    restore_quantized,
    save_quantized,
)
from dg_pipeline.quant.tied import sync_tied_quantizers, tied_amax_mismatches

register_nvfp4_backend()

__all__ = [
    "FORMATS",
    "KV_CACHE_MODES",
    "NVFP4_BACKEND",
    "QUANT_JSON",
    "STATE_FILE",
    "CalibrationResult",
    "ExpertTokenCounter",
    "FP8Linear",
    "LogitsErrorProbe",
    "QuantRecipe",
    "apply_uncovered_expert_rule",
    "audit_quantizers",
    "build_recipe",
    "calibrate",
    "calibration_examples",
    "calibration_forward_loop",
    "coverage_report",
    "diffusion_forward_loop",
    "fake_quant_nvfp4",
    "share_fused_scales",
    "uncovered_summary",
    "fold_weights_for_eval",
    "fp8_gemm_supported",
    "read_quant_record",
    "register_nvfp4_backend",
    "relative_l2",
    "restore_quantized",
    "save_quantized",
    "swap_in_fp8_gemms",
    "sync_tied_quantizers",
    "text_forward_loop",
    "tied_amax_mismatches",
]
