"""dg_pipeline: base weights -> diffusion SFT -> ModelOpt FP8/NVFP4 -> vLLM/TensorRT-LLM export, gated at every stage."""

__version__ = "0.1.0"
