"""Model: named configs, loading/saving DiffusionGemma dirs, Gemma 4 -> DiffusionGemma conversion."""

from dg_pipeline.model.configs import NAMED_SHAPES, build_config, build_model
from dg_pipeline.model.convert import (
    ConversionReport,
    check_convertible,
    conversion_parity,
    convert_gemma4,
    unsupported_features,
    vision_parity,
)
from dg_pipeline.model.inspect import CheckpointInfo, inspect_checkpoint
from dg_pipeline.model.io import LoadedModel, load_base, load_model, resolve_device, resolve_dtype, save_model
from dg_pipeline.model.logits import encoder_causal_lm_logits, softcap_logits
from dg_pipeline.model.structure import parameter_counts, untied_backbone_weights

__all__ = [
    "NAMED_SHAPES",
    "build_config",
    "build_model",
    "load_model",
    "load_base",
    "LoadedModel",
    "save_model",
    "resolve_device",
    "resolve_dtype",
    "inspect_checkpoint",
    "CheckpointInfo",
    "convert_gemma4",
    "check_convertible",
    "unsupported_features",
    "conversion_parity",
    "vision_parity",
    "ConversionReport",
    "encoder_causal_lm_logits",
    "softcap_logits",
    "parameter_counts",
    "untied_backbone_weights",
]
