"""A quantized DiffusionGemma without a training run: a named shape, randomly initialised, calibrated on random
tokens with the project's quantization recipes. For the size benchmark and the export tests, where the numbers
that matter (bytes, tensor layout, reload parity) do not depend on trained weights.
"""

from __future__ import annotations

import torch

from dg_pipeline.model.configs import build_model


def random_calibration_loop(vocab_size: int, canvas_length: int, batches: int = 2, batch_size: int = 4,
                            prompt_length: int = 12, seed: int = 0):
    """A ModelOpt forward loop over random prompts (encoder) and random canvases (decoder)."""
    generator = torch.Generator().manual_seed(seed)
    data = [
        (torch.randint(0, vocab_size, (batch_size, prompt_length), generator=generator),
         torch.randint(0, vocab_size, (batch_size, canvas_length), generator=generator))
        for _ in range(batches)
    ]

    def loop(model) -> None:
        with torch.no_grad():
            for ids, canvas in data:
                model(input_ids=ids.to(model.device), decoder_input_ids=canvas.to(model.device))

    return loop


def quantized_random_model(shape: str, quant: str, tokenizer, canvas_length: int, seed: int = 0,
                           vocab_size: int | None = None, kv_cache: str = "none"):
    """A `shape` model (dg_pipeline.model.configs) quantized to `quant` (fp8 | nvfp4 | nvfp4_experts_only) with
    the quantize stage's recipe, calibrated on random tokens; NVFP4 runs through the CPU emulation off-GPU."""
    from dg_pipeline.quant import build_recipe, calibrate

    model = build_model(shape, tokenizer, canvas_length, seed=seed, vocab_size=vocab_size)
    recipe = build_recipe(quant, kv_cache, device=model.device)
    # The quantize stage's calibration: mtq.quantize, then the tied-stream sync and the unrouted-expert rule.
    calibrate(model, recipe, random_calibration_loop(model.config.text_config.vocab_size, canvas_length, seed=seed))
    return model
