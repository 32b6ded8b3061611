"""dg_pipeline: base weights -> diffusion SFT -> ModelOpt FP8/NVFP4 -> a vLLM release bundle, gated at every stage."""

__version__ = "0.1.0"
