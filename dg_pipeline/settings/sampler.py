"""Sampler settings, in one place: the generation_config.json keys vLLM reads, their defaults (transformers' own),
the rules their values follow, the `sampler` config group, and the one way to build a generation config.

A checkpoint carries its sampler defaults in generation_config.json; a run's `sampler.*` keys that are not null
override them (null = run the checkpoint as vLLM would). `dg_pipeline.sampling.SamplerConfig.for_model` builds the
sampler from both; `generation_config` writes them back (model dirs, release bundles).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

from dg_pipeline.core.errors import InputError
from dg_pipeline.settings.checks import check_choice, check_number, check_positive_int

# The generation_config.json keys vLLM's DiffusionGemma reads, by their flat name: `entropy_bound` is stored as
# sampler_config.entropy_bound (an EntropyBoundSamplerConfig). The one list every reader and writer iterates.
SAMPLER_KEYS = ("max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold", "confidence_threshold")
# The special-token ids generation_config.json carries next to them (the sampler stops at EOS and pads with PAD).
TOKEN_ID_KEYS = ("eos_token_id", "pad_token_id", "bos_token_id")
# The keys transformers validates as floats (a YAML `1` is turned into 1.0 before it sees them).
FLOAT_KEYS = tuple(k for k in SAMPLER_KEYS if k not in ("max_denoising_steps", "stability_threshold"))

ACCEPTANCE_RULES = ("entropy_bound", "confidence")
CANVAS_INITS = ("uniform", "mask")
COMPILE_MODES = ("auto", "true", "false")
KV_CACHES = ("auto", "dynamic", "static")


def check_sampler_values(values: Mapping[str, Any]) -> None:
    """The rules of every sampler value present in `values` (None = unset, not checked); InputError names the key."""
    v = {k: x for k, x in values.items() if x is not None}
    if "max_denoising_steps" in v:
        check_positive_int("sampler.max_denoising_steps", v["max_denoising_steps"])
    if "entropy_bound" in v:
        check_number("sampler.entropy_bound", v["entropy_bound"], low=0.0, low_inclusive=False)
    for key in ("t_min", "t_max"):
        if key in v:
            check_number(f"sampler.{key}", v[key], low=0.0)
    if "t_min" in v and "t_max" in v and v["t_max"] <= v["t_min"]:
        raise InputError(f"sampler.t_max={v['t_max']} must be greater than sampler.t_min={v['t_min']} "
                         "(t_max is the first step's temperature, t_min the last's)")
    stability = v.get("stability_threshold", 0)
    if not isinstance(stability, int) or isinstance(stability, bool) or stability < 0:
        raise InputError(f"sampler.stability_threshold={stability!r}: must be an integer >= 0")
    if "confidence_threshold" in v:
        check_number("sampler.confidence_threshold", v["confidence_threshold"], low=0.0, low_inclusive=False)
    if "accept_threshold" in v:
        check_number("sampler.accept_threshold", v["accept_threshold"], low=0.0, low_inclusive=False, high=1.0)
    for key, choices in (("acceptance", ACCEPTANCE_RULES), ("canvas_init", CANVAS_INITS), ("compile", COMPILE_MODES),
                         ("kv_cache", KV_CACHES)):
        if key in v:
            check_choice(f"sampler.{key}", v[key], choices)
    if v.get("compile") == "true" and v.get("kv_cache") == "dynamic":
        raise InputError("sampler.compile=true needs fixed shapes: set sampler.kv_cache=static (or auto), or "
                         "compile=false")


def compile_mode(value: Any) -> Any:
    """YAML and the command line give `compile: true/false` as a bool (or its string); the sampler takes a word."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value.lower() if isinstance(value, str) else value


@dataclass
class SamplerSettings:
    """The `sampler` config group (conf/sampler/default.yaml documents every key)."""

    max_denoising_steps: Optional[int] = None
    entropy_bound: Optional[float] = None
    t_min: Optional[float] = None
    t_max: Optional[float] = None
    stability_threshold: Optional[int] = None
    confidence_threshold: Optional[float] = None
    acceptance: str = "entropy_bound"
    accept_threshold: float = 0.9
    canvas_init: Optional[str] = None
    max_new_tokens: Optional[int] = None
    batch_size: int = 16
    seed: int = 0
    compile: str = "auto"
    kv_cache: str = "auto"

    def __post_init__(self) -> None:
        self.compile = compile_mode(self.compile)
        check_sampler_values({f.name: getattr(self, f.name) for f in fields(self)})
        check_positive_int("sampler.max_new_tokens", self.max_new_tokens, "a positive number of tokens", optional=True)
        check_positive_int("sampler.batch_size", self.batch_size)

    def generation_overrides(self) -> dict[str, Any]:
        """The generation_config.json values this run sets (its non-null SAMPLER_KEYS)."""
        return {k: getattr(self, k) for k in SAMPLER_KEYS if getattr(self, k) is not None}

    def sampler_overrides(self) -> dict[str, Any]:
        """What the sampler takes from this group: the generation overrides and the sampler's own options."""
        own = {k: getattr(self, k) for k in ("acceptance", "accept_threshold", "canvas_init", "compile", "kv_cache")}
        return {**self.generation_overrides(), **{k: v for k, v in own.items() if v is not None}}


# ------------------------------------------------------------------------------------------ generation configs


def reference_defaults() -> dict[str, Any]:
    """transformers' defaults for the SAMPLER_KEYS (what `DiffusionGemmaForBlockDiffusion.generate` falls back to)."""
    from transformers import DiffusionGemmaGenerationConfig

    return read_sampler_settings(DiffusionGemmaGenerationConfig._get_default_generation_params(), SAMPLER_KEYS)


def read_sampler_settings(generation_config: Any, keys: tuple[str, ...] = SAMPLER_KEYS + TOKEN_ID_KEYS) -> dict:
    """{flat key: value or None} of a generation config (the object, or generation_config.json as a dict)."""
    if generation_config is None:
        return dict.fromkeys(keys)
    if isinstance(generation_config, Mapping):
        get = generation_config.get
    else:
        def get(key):
            return getattr(generation_config, key, None)
    out = {}
    for key in keys:
        if key == "entropy_bound":
            sampler = get("sampler_config")
            out[key] = sampler.get(key) if isinstance(sampler, Mapping) else getattr(sampler, key, None)
        else:
            out[key] = get(key)
    return out


def _generation_kwargs(values: Mapping[str, Any]) -> dict[str, Any]:
    """DiffusionGemmaGenerationConfig keyword arguments from flat non-None values (floats where it wants floats)."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    out = {k: float(v) if k in FLOAT_KEYS else v for k, v in values.items() if v is not None}
    if "entropy_bound" in out:
        out["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=out.pop("entropy_bound"))
    return out


def generation_config(tokenizer, base: Any = None, model_config: Any = None, **overrides: Any):
    """A DiffusionGemmaGenerationConfig: `base` (a checkpoint's config, of any GenerationConfig class; None = empty),
    the non-None `overrides` on top (flat keys, e.g. entropy_bound), every sampler key still unset from transformers'
    defaults, and the eos/pad/bos ids where the config has none: the model config's (`model_config`, e.g. a
    converted Gemma 4's eos list [1, 106]), else the tokenizer's. The tokenizer's single eos_token never replaces a
    list the checkpoint states."""
    from transformers import DiffusionGemmaGenerationConfig

    unknown = sorted(set(overrides) - set(SAMPLER_KEYS + TOKEN_ID_KEYS))
    if unknown:
        raise InputError(f"generation config: unknown sampler key(s) {unknown}; known: {list(SAMPLER_KEYS)}")
    if isinstance(base, DiffusionGemmaGenerationConfig):
        config = copy.deepcopy(base)
    else:  # a plain GenerationConfig (e.g. built from a model config): keep what it states
        config = DiffusionGemmaGenerationConfig()
        stated = {k: v for k, v in read_sampler_settings(base).items() if v is not None}
        overrides = {**stated, **{k: v for k, v in overrides.items() if v is not None}}
    text = model_config.get_text_config() if model_config is not None else None
    token_ids = {key: getattr(text, key, None) for key in TOKEN_ID_KEYS} if text is not None else {}
    tokenizer_ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                     "bos_token_id": tokenizer.bos_token_id}
    token_ids = {k: token_ids.get(k) if token_ids.get(k) is not None else tokenizer_ids[k] for k in TOKEN_ID_KEYS}
    try:
        config.update(**_generation_kwargs(overrides))
        config.update(**_generation_kwargs(reference_defaults()), **token_ids, defaults_only=True)
    except (TypeError, ValueError) as e:
        raise InputError(f"generation config: {e} (check the sampler.* keys / overrides)") from None
    return config


def eos_token_ids(generation_config: Any, model_config: Any = None) -> tuple[int, ...]:
    """Every id generation stops at: the generation config's eos_token_id (an id or a list), else the model
    config's; () when neither states one. The sampler, the data (where a supervised turn ends) and the scorers
    read it here."""
    eos = read_sampler_settings(generation_config, ("eos_token_id",))["eos_token_id"]
    if eos is None and model_config is not None:
        eos = getattr(model_config.get_text_config(), "eos_token_id", None)
    if eos is None:
        return ()
    return (int(eos),) if isinstance(eos, int) else tuple(int(e) for e in eos)


__all__ = [
    "ACCEPTANCE_RULES",
    "CANVAS_INITS",
    "COMPILE_MODES",
    "FLOAT_KEYS",
    "KV_CACHES",
    "SAMPLER_KEYS",
    "TOKEN_ID_KEYS",
    "SamplerSettings",
    "check_sampler_values",
    "compile_mode",
    "eos_token_ids",
    "generation_config",
    "read_sampler_settings",
    "reference_defaults",
]
