"""Model: named configs, loading/saving DiffusionGemma dirs, Gemma 4 -> DiffusionGemma conversion."""

from dg_pipeline.model.configs import NAMED_SHAPES, build_config

__all__ = ["NAMED_SHAPES", "build_config"]
