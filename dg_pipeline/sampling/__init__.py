"""Block-diffusion sampling (acceptance rules, temperature schedule, stopping) and autoregressive decoding on the same
weights. See docs/ARCHITECTURE.md (sampling) for the contract."""

from dg_pipeline.sampling.acceptance import (
    ConfidenceThresholdAcceptance,
    EntropyBoundAcceptance,
    Prediction,
    build_acceptance,
    token_entropy,
)
from dg_pipeline.sampling.autoregressive import ar_generate
from dg_pipeline.sampling.cache import DecoderView, DynamicBlockCache, StaticBlockCache
from dg_pipeline.sampling.canvas import MaskCanvas, UniformCanvas, sample_categorical
from dg_pipeline.sampling.config import SamplerConfig
from dg_pipeline.sampling.randomness import RandomStream, StepDraws, draw_step
from dg_pipeline.sampling.sampler import BlockDiffusionSampler, GenerationResult, TrajectoryStep
from dg_pipeline.sampling.schedule import LinearTemperatureSchedule
from dg_pipeline.sampling.stopping import StableAndConfidentStop, contains_eos, pad_after_eos

__all__ = [
    "BlockDiffusionSampler",
    "ConfidenceThresholdAcceptance",
    "DecoderView",
    "DynamicBlockCache",
    "EntropyBoundAcceptance",
    "GenerationResult",
    "LinearTemperatureSchedule",
    "MaskCanvas",
    "Prediction",
    "RandomStream",
    "SamplerConfig",
    "StableAndConfidentStop",
    "StaticBlockCache",
    "StepDraws",
    "TrajectoryStep",
    "UniformCanvas",
    "ar_generate",
    "build_acceptance",
    "contains_eos",
    "draw_step",
    "pad_after_eos",
    "sample_categorical",
    "token_entropy",
]
