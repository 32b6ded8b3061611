"""Sampler settings: the checkpoint's generation_config.json keys (the ones vLLM reads) plus this sampler's options.

`SamplerConfig.from_generation_config(gen_cfg, **overrides)` takes its defaults from a checkpoint's
`DiffusionGemmaGenerationConfig`; an override of None keeps the checkpoint's value, so a Hydra `sampler:` group whose
keys are `null` runs the checkpoint exactly as vLLM would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from dg_pipeline.core.errors import InputError

ACCEPTANCE_RULES = ("entropy_bound", "confidence")
CANVAS_INITS = ("uniform", "mask")
COMPILE_MODES = ("auto", "true", "false")
KV_CACHES = ("auto", "dynamic", "static")

# generation_config.json key -> SamplerConfig field (sampler_config.entropy_bound is nested, read separately).
_GENERATION_KEYS = {
    "max_denoising_steps": "max_denoising_steps",
    "t_min": "t_min",
    "t_max": "t_max",
    "stability_threshold": "stability_threshold",
    "confidence_threshold": "confidence_threshold",
    "pad_token_id": "pad_token_id",
}


@dataclass(frozen=True)
class SamplerConfig:
    """Everything the block-diffusion sampler needs to know besides the model and the prompt.

    Defaults are the reference's (`DiffusionGemmaGenerationConfig` global defaults); a checkpoint's
    generation_config.json overrides them through `from_generation_config`.
    """

    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # entropy_bound (DiffusionGemma) | confidence (commit every position with max prob >= accept_threshold)
    acceptance: str = "entropy_bound"
    accept_threshold: float = 0.9
    # uniform (uniform-state objective: random tokens, re-noise) | mask (masked objective: <mask>, re-mask)
    canvas_init: str = "uniform"
    mask_token_id: int | None = None
    # auto = torch.compile + CUDA graphs on CUDA, eager on CPU
    compile: str = "auto"
    # auto = static (preallocated, fixed shapes) when compiling, else dynamic (the reference's cache: bit-identical)
    kv_cache: str = "auto"

    def __post_init__(self) -> None:
        _check_positive_int("max_denoising_steps", self.max_denoising_steps)
        _check_number("entropy_bound", self.entropy_bound, low=0.0, low_inclusive=False)
        _check_number("t_min", self.t_min, low=0.0)
        _check_number("t_max", self.t_max, low=0.0)
        if self.t_max <= self.t_min:
            raise InputError(
                f"sampler.t_max={self.t_max} must be greater than sampler.t_min={self.t_min} "
                "(t_max is the first step's temperature, t_min the last's)"
            )
        if not isinstance(self.stability_threshold, int) or self.stability_threshold < 0:
            raise InputError(f"sampler.stability_threshold={self.stability_threshold!r}: must be an integer >= 0")
        _check_number("confidence_threshold", self.confidence_threshold, low=0.0, low_inclusive=False)
        _check_choice("acceptance", self.acceptance, ACCEPTANCE_RULES)
        _check_number("accept_threshold", self.accept_threshold, low=0.0, low_inclusive=False, high=1.0)
        _check_choice("canvas_init", self.canvas_init, CANVAS_INITS)
        _check_choice("compile", self.compile, COMPILE_MODES)
        _check_choice("kv_cache", self.kv_cache, KV_CACHES)
        if self.canvas_init == "mask" and self.mask_token_id is None:
            raise InputError(
                "sampler.canvas_init=mask needs a mask token id: pass mask_token_id= "
                "(the board tokenizer's <mask> is 4)"
            )
        if self.compile == "true" and self.kv_cache == "dynamic":
            raise InputError(
                "sampler.compile=true needs fixed shapes: set sampler.kv_cache=static (or auto), or compile=false"
            )

    @classmethod
    def from_generation_config(cls, gen_cfg: Any | None, **overrides: Any) -> "SamplerConfig":
        """Defaults from a checkpoint's generation config (object or dict); overrides of None keep its values."""
        values: dict[str, Any] = {}
        if gen_cfg is not None:
            get = gen_cfg.get if isinstance(gen_cfg, Mapping) else (lambda k: getattr(gen_cfg, k, None))
            for key, field in _GENERATION_KEYS.items():
                if get(key) is not None:
                    values[field] = get(key)
            sampler_cfg = get("sampler_config")
            bound = sampler_cfg.get("entropy_bound") if isinstance(sampler_cfg, Mapping) else getattr(
                sampler_cfg, "entropy_bound", None
            )
            if bound is not None:
                values["entropy_bound"] = bound
            if get("eos_token_id") is not None:
                values["eos_token_ids"] = get("eos_token_id")
        values.update(_checked_overrides(overrides))
        return cls(**_coerced(values))

    @classmethod
    def for_model(cls, model: Any, **overrides: Any) -> "SamplerConfig":
        """From `model.generation_config`; eos/pad ids fall back to the model config where the generation config
        lacks them."""
        gen_cfg = getattr(model, "generation_config", None)
        text_cfg = model.config.get_text_config()
        fallback = {"eos_token_ids": text_cfg.eos_token_id, "pad_token_id": text_cfg.pad_token_id}
        if gen_cfg is not None:
            fallback = {
                "eos_token_ids": gen_cfg.eos_token_id if gen_cfg.eos_token_id is not None else text_cfg.eos_token_id,
                "pad_token_id": gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else text_cfg.pad_token_id,
            }
        merged = {**fallback, **{k: v for k, v in overrides.items() if v is not None}}
        return cls.from_generation_config(gen_cfg, **merged)

    @classmethod
    def from_hydra(cls, sampler_cfg: Mapping[str, Any], gen_cfg: Any | None, **extra: Any) -> "SamplerConfig":
        """From the `sampler:` config group: keys that are SamplerConfig fields override the checkpoint; the rest
        (max_new_tokens, batch_size, seed) belong to the caller."""
        names = {f.name for f in dataclasses.fields(cls)}
        overrides = {k: v for k, v in dict(sampler_cfg).items() if k in names}
        return cls.from_generation_config(gen_cfg, **overrides, **extra)

    def replace(self, **changes: Any) -> "SamplerConfig":
        return dataclasses.replace(self, **_coerced(_checked_overrides(changes)))

    def use_compile(self, device: torch.device) -> bool:
        # auto compiles on CUDA unless the dynamic cache was asked for (its shapes change every block).
        auto = self.compile == "auto" and device.type == "cuda" and self.kv_cache != "dynamic"
        return self.compile == "true" or auto

    def use_static_cache(self, device: torch.device) -> bool:
        return self.kv_cache == "static" or (self.kv_cache == "auto" and self.use_compile(device))


def _checked_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(SamplerConfig)}
    out = {}
    for key, value in overrides.items():
        field = "eos_token_ids" if key == "eos_token_id" else key
        if field not in names:
            raise InputError(f"sampler.{key}: unknown sampler setting; known settings: {sorted(names)}")
        if value is not None:
            out[field] = value
    return out


def _coerced(values: dict[str, Any]) -> dict[str, Any]:
    """YAML/JSON give ints for floats and bools for `compile`; normalise so validation sees one type per key."""
    out = dict(values)
    for key in ("entropy_bound", "t_min", "t_max", "confidence_threshold", "accept_threshold"):
        if isinstance(out.get(key), int) and not isinstance(out.get(key), bool):
            out[key] = float(out[key])
    if isinstance(out.get("compile"), bool):
        out["compile"] = "true" if out["compile"] else "false"
    if "eos_token_ids" in out:
        eos = out["eos_token_ids"]
        eos = [eos] if isinstance(eos, int) else list(eos)
        if not all(isinstance(e, int) and e >= 0 for e in eos):
            raise InputError(f"sampler.eos_token_id={eos!r}: must be a token id or a list of token ids")
        out["eos_token_ids"] = tuple(eos)
    return out


def _check_positive_int(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"sampler.{key}={value!r}: must be a positive integer")


def _check_number(
    key: str, value: Any, low: float, low_inclusive: bool = True, high: float | None = None
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value >= low if low_inclusive else value > low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>=' if low_inclusive else '>'} {low}" + (f" and <= {high}" if high is not None else "")
        raise InputError(f"sampler.{key}={value!r}: must be a number {bound}")


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"sampler.{key}={value!r}: choose one of {list(choices)}")
