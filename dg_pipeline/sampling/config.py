"""The sampler's settings: the checkpoint's generation_config.json keys (the ones vLLM reads, see
dg_pipeline.settings.sampler) plus this sampler's own options.

`SamplerConfig.for_model(model, settings, tokenizer)` is the one way a run builds its sampler (the gate,
calibration, the benchmarks): the checkpoint's generation config, the non-null `sampler.*` keys on top. An override
of None keeps the checkpoint's value, so a `sampler:` group whose keys are `null` runs the checkpoint as vLLM would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from dg_pipeline.core.errors import InputError
from dg_pipeline.settings.sampler import (
    FLOAT_KEYS,
    SAMPLER_KEYS,
    SamplerSettings,
    check_sampler_values,
    eos_token_ids,
    compile_mode,
    read_sampler_settings,
    reference_defaults,
)

_REFERENCE = reference_defaults()  # transformers' DiffusionGemmaGenerationConfig defaults


@dataclass(frozen=True)
class SamplerConfig:
    """Everything the block-diffusion sampler needs to know besides the model and the prompt.

    Defaults are transformers' (`DiffusionGemmaGenerationConfig`'s global defaults); a checkpoint's
    generation_config.json overrides them through `from_generation_config`.
    """

    max_denoising_steps: int = _REFERENCE["max_denoising_steps"]
    entropy_bound: float = _REFERENCE["entropy_bound"]
    t_min: float = _REFERENCE["t_min"]
    t_max: float = _REFERENCE["t_max"]
    stability_threshold: int = _REFERENCE["stability_threshold"]
    confidence_threshold: float = _REFERENCE["confidence_threshold"]
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
        check_sampler_values(dataclasses.asdict(self))
        if self.canvas_init == "mask" and self.mask_token_id is None:
            raise InputError(
                "sampler.canvas_init=mask needs a mask token id: pass mask_token_id= "
                "(the board tokenizer's <mask> is 4)"
            )

    @classmethod
    def from_generation_config(cls, gen_cfg: Any | None, **overrides: Any) -> "SamplerConfig":
        """Defaults from a checkpoint's generation config (object or dict); overrides of None keep its values."""
        keys = (*SAMPLER_KEYS, "eos_token_id", "pad_token_id")
        values = {k: v for k, v in read_sampler_settings(gen_cfg, keys).items() if v is not None}
        if "eos_token_id" in values:
            values["eos_token_ids"] = values.pop("eos_token_id")
        values.update(_checked_overrides(overrides))
        return cls(**_coerced(values))

    @classmethod
    def for_model(cls, model: Any, settings: SamplerSettings | None = None, tokenizer: Any = None,
                  **changes: Any) -> "SamplerConfig":
        """The sampler a run's `sampler` settings describe on `model`: its generation_config (eos/pad ids from the
        model config where it lacks them), the non-null settings, then `changes`. A mask canvas takes the
        tokenizer's <mask> id."""
        gen_cfg = getattr(model, "generation_config", None)
        text_cfg = model.config.get_text_config()
        own = read_sampler_settings(gen_cfg, ("pad_token_id",))
        values = {
            "eos_token_ids": eos_token_ids(gen_cfg, model.config) or None,
            "pad_token_id": own["pad_token_id"] if own["pad_token_id"] is not None else text_cfg.pad_token_id,
            **(settings.sampler_overrides() if settings is not None else {}),
            **{k: v for k, v in changes.items() if v is not None},
        }
        if values.get("canvas_init") == "mask" and tokenizer is not None:
            values.setdefault("mask_token_id", tokenizer.mask_token_id)
        return cls.from_generation_config(gen_cfg, **values)

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
    for key in (*FLOAT_KEYS, "accept_threshold"):
        if isinstance(out.get(key), int) and not isinstance(out.get(key), bool):
            out[key] = float(out[key])
    if "compile" in out:
        out["compile"] = compile_mode(out["compile"])
    if "eos_token_ids" in out:
        eos = out["eos_token_ids"]
        eos = [eos] if isinstance(eos, int) else list(eos)
        if not all(isinstance(e, int) and e >= 0 for e in eos):
            raise InputError(f"sampler.eos_token_id={eos!r}: must be a token id or a list of token ids")
        out["eos_token_ids"] = tuple(eos)
    return out
