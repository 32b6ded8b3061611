"""The sampler defaults written into every model dir's generation_config.json (the keys vLLM and
`DiffusionGemmaForBlockDiffusion.generate` read): the reference DiffusionGemma settings plus the tokenizer's ids."""

from __future__ import annotations

import copy
from typing import Any

from transformers import DiffusionGemmaGenerationConfig
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

from dg_pipeline.core.errors import InputError

# The published DiffusionGemma sampler settings (docs/ARCHITECTURE.md, "model" contract).
REFERENCE_SAMPLER_DEFAULTS: dict[str, Any] = {
    "max_denoising_steps": 48,
    "entropy_bound": 0.1,
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}


def default_generation_config(tokenizer, **overrides: Any) -> DiffusionGemmaGenerationConfig:
    """A DiffusionGemmaGenerationConfig with the reference sampler defaults and the tokenizer's eos/pad/bos ids.

    `overrides` may set any DiffusionGemmaGenerationConfig attribute, plus `entropy_bound` as a shortcut for
    `sampler_config=EntropyBoundSamplerConfig(entropy_bound=...)`. None values are ignored (the conf/sampler
    convention: null = keep the default).
    """
    settings = dict(REFERENCE_SAMPLER_DEFAULTS)
    settings.update(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id
    )
    settings.update({k: v for k, v in overrides.items() if v is not None})
    entropy_bound = settings.pop("entropy_bound")
    if "sampler_config" not in settings:
        # The sampler config rejects ints (e.g. a YAML `1`), so coerce here rather than fail deep inside.
        settings["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(entropy_bound))
    for key in ("t_min", "t_max", "confidence_threshold"):
        settings[key] = float(settings[key])
    try:
        return DiffusionGemmaGenerationConfig(**settings)
    except (TypeError, ValueError) as e:
        raise InputError(f"generation config: {e} (check the sampler.* keys / overrides)") from None


# Attributes default_generation_config sets; an existing config keeps its own value for each one it has.
_DEFAULTED = ("max_denoising_steps", "sampler_config", "t_min", "t_max", "stability_threshold",
              "confidence_threshold", "eos_token_id", "pad_token_id", "bos_token_id")


def complete_generation_config(generation_config, tokenizer) -> DiffusionGemmaGenerationConfig:
    """`generation_config` with every unset sampler key / special id filled from default_generation_config.

    A checkpoint saved by plain `save_pretrained` carries a generation_config.json of nulls; this makes it usable.
    """
    defaults = default_generation_config(tokenizer)
    if not isinstance(generation_config, DiffusionGemmaGenerationConfig):
        return defaults
    completed = copy.deepcopy(generation_config)
    for key in _DEFAULTED:
        if getattr(completed, key, None) is None:
            setattr(completed, key, getattr(defaults, key))
    completed.validate()
    return completed
