"""dg_pipeline: base weights -> diffusion SFT -> ModelOpt FP8/NVFP4 -> a vLLM release bundle, gated at every stage."""

# Registers the typed schema conf/config.yaml composes onto, for every entry point (CLI, tests, notebooks).
import dg_pipeline.settings  # noqa: E402,F401

__version__ = "0.1.0"
