"""The ModelOpt quantization config for each `quant=<name>`: ModelOpt's own presets plus DiffusionGemma exclusions.

- fp8                 `mtq.FP8_DEFAULT_CFG` (E4M3 per-tensor weights and inputs on every linear and expert);
- nvfp4               `mtq.NVFP4_DEFAULT_CFG` (E2M1, blocks of 16, E4M3 block scales, weights and inputs);
- nvfp4_experts_only  ModelOpt's DiffusionGemma recipe `modelopt_recipes/huggingface/diffusion_gemma/ptq/
                      nvfp4_experts_only.yaml`: only the MoE experts in NVFP4, KV cache cast to FP8.
KV cache (`quant.kv_cache`): none | fp8 (ModelOpt's `FP8_KV_CFG`, calibrated k/v amax) | fp8_cast (ModelOpt's
`kv/fp8_cast` preset, constant amax 448, no calibration).

Kept in high precision: ModelOpt's standard exclusions (lm_head, routers, embeddings, the vision tower and
embed_vision, ...) plus the self-conditioning block, as the DiffusionGemma recipe does. `quant.self_conditioning=true`
quantizes it too; that needs calib.mode=diffusion, the only loop that runs self-conditioned decoder passes (a text
loop feeds it zeros: amax 0, which ModelOpt's FP8 path turns into a clamp to [-1, 1] at inference).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from dg_pipeline.core.errors import InputError
from dg_pipeline.quant.nvfp4_cpu import NVFP4_BACKEND, register_nvfp4_backend
from dg_pipeline.settings.quant import KV_CACHE_MODES, NVFP4_BACKENDS
from dg_pipeline.settings.quant import QUANT_FORMATS as FORMATS

EXPERTS_ONLY_RECIPE = "huggingface/diffusion_gemma/ptq/nvfp4_experts_only"
FP8_CAST_KV_PRESET = "configs/ptq/presets/kv/fp8_cast"
KV_QUANTIZERS = "*[kv]_bmm_quantizer"
SELF_CONDITIONING = "*self_conditioning*"
# Where each format's base config comes from (recorded in quant.json).
SOURCES = {
    "fp8": "modelopt.torch.quantization.FP8_DEFAULT_CFG",
    "nvfp4": "modelopt.torch.quantization.NVFP4_DEFAULT_CFG",
    "nvfp4_experts_only": f"modelopt_recipes/{EXPERTS_ONLY_RECIPE}.yaml",
}


@dataclass
class QuantRecipe:
    """One resolved quantization: the dict `mtq.quantize` takes, and what quant.json records about it."""

    name: str
    kv_cache: str
    config: dict[str, Any]
    source: str
    self_conditioning: bool
    nvfp4_backend: str | None  # the ModelOpt `backend` name on NVFP4 quantizers; None = ModelOpt's CUDA kernel
    extra_exclusions: list[str] = field(default_factory=list)

    @property
    def exclusions(self) -> list[str]:
        """Quantizer-name patterns the config disables (after its leading disable-all entry)."""
        out = []
        for entry in self.config["quant_cfg"][1:]:
            if entry.get("enable") is False and "cfg" not in entry:
                pattern = entry["quantizer_name"]
                parent = entry.get("parent_class")
                label = f"{pattern} (in {parent})" if parent else pattern
                if label not in out:
                    out.append(label)
        return out

    @property
    def uses_nvfp4(self) -> bool:
        return self.name.startswith("nvfp4")


def base_config(name: str) -> dict[str, Any]:
    """A fresh copy of ModelOpt's config for a format (never mutate ModelOpt's module-level presets)."""
    import modelopt.torch.quantization as mtq

    if name == "fp8":
        return copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    if name == "nvfp4":
        return copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    if name == "nvfp4_experts_only":
        from modelopt.recipe import load_recipe

        return load_recipe(EXPERTS_ONLY_RECIPE).quantize.model_dump(exclude_unset=True)
    raise InputError(f"quant.name={name}: unknown format; choose one of {', '.join(FORMATS)} (conf/quant/<name>.yaml)")


def kv_cache_entries(kv_cache: str) -> list[dict[str, Any]]:
    """quant_cfg entries for the KV cache (k/v bmm quantizers of every attention), from ModelOpt's KV presets."""
    import modelopt.torch.quantization as mtq

    if kv_cache == "none":
        return [{"quantizer_name": KV_QUANTIZERS, "enable": False}]
    if kv_cache == "fp8":
        return copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
    if kv_cache == "fp8_cast":
        from modelopt.torch.opt.config_loader import load_config
        from modelopt.torch.quantization.config import QuantizeConfig

        return load_config(FP8_CAST_KV_PRESET, schema_type=QuantizeConfig).model_dump(exclude_unset=True)["quant_cfg"]
    raise InputError(f"quant.kv_cache={kv_cache}: choose one of {', '.join(KV_CACHE_MODES)}")


def resolve_nvfp4_backend(choice: str, device: torch.device) -> str | None:
    """auto: ModelOpt's own NVFP4 kernel where it runs (CUDA, compute capability >= 8.9), else the emulation."""
    if choice not in NVFP4_BACKENDS:
        raise InputError(f"quant.nvfp4_backend={choice}: choose one of {', '.join(NVFP4_BACKENDS)}")
    if choice == "modelopt":
        if device.type != "cuda":
            raise InputError(
                "quant.nvfp4_backend=modelopt: ModelOpt's NVFP4 fake-quant needs a CUDA device; "
                "use quant.nvfp4_backend=auto (CPU emulation) or device=cuda"
            )
        return None
    if choice == "auto" and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        return None
    return register_nvfp4_backend()


def _is_nvfp4_cfg(cfg: Any) -> bool:
    if not isinstance(cfg, dict):
        return False
    scale_bits = (cfg.get("block_sizes") or {}).get("scale_bits")
    return tuple(cfg.get("num_bits") or ()) == (2, 1) and tuple(scale_bits or ()) == (4, 3)


def with_backend(quant_cfg: list[dict[str, Any]], backend: str) -> None:
    """Point every NVFP4 quantizer entry at `backend` (ModelOpt's QuantizerAttributeConfig.backend field)."""
    for entry in quant_cfg:
        cfgs = entry.get("cfg")
        for cfg in cfgs if isinstance(cfgs, list) else [cfgs]:
            if _is_nvfp4_cfg(cfg):
                cfg["backend"] = backend


def build_recipe(
    name: str,
    kv_cache: str = "none",
    *,
    self_conditioning: bool = False,
    extra_exclusions: list[str] | tuple[str, ...] = (),
    nvfp4_backend: str = "auto",
    device: torch.device | str = "cpu",
) -> QuantRecipe:
    """The ModelOpt config for `quant=<name>` with `quant.kv_cache`, exclusions and the NVFP4 backend applied."""
    if kv_cache not in KV_CACHE_MODES:
        raise InputError(f"quant.kv_cache={kv_cache}: choose one of {', '.join(KV_CACHE_MODES)}")
    config = base_config(name)
    # Calibration always runs in one process (rank 0 of a multi-process job, the other ranks waiting): ModelOpt
    # would otherwise all-reduce every amax over the default process group, which the waiting ranks never join.
    algorithm = config.get("algorithm") or "max"
    config["algorithm"] = {**({"method": algorithm} if isinstance(algorithm, str) else algorithm),
                           "distributed_sync": False}
    quant_cfg = config["quant_cfg"]
    # Later entries win (ModelOpt applies the list in order): the KV choice, then the base config's exclusions again
    # (so a KV pattern cannot re-enable an excluded vision tower), then ours.
    exclusions = [copy.deepcopy(e) for e in quant_cfg[1:] if e.get("enable") is False and "cfg" not in e]
    quant_cfg.extend(kv_cache_entries(kv_cache))
    quant_cfg.extend(exclusions)
    if not self_conditioning:
        quant_cfg.append({"quantizer_name": SELF_CONDITIONING, "enable": False})
    for pattern in extra_exclusions:
        quant_cfg.append({"quantizer_name": str(pattern), "enable": False})
    backend = None
    if name.startswith("nvfp4"):
        backend = resolve_nvfp4_backend(nvfp4_backend, torch.device(device))
        if backend is not None:
            with_backend(quant_cfg, backend)
    return QuantRecipe(
        name=name,
        kv_cache=kv_cache,
        config=config,
        source=SOURCES[name],
        self_conditioning=self_conditioning,
        nvfp4_backend=backend,
        extra_exclusions=[str(p) for p in extra_exclusions],
    )


__all__ = [
    "FORMATS",
    "KV_CACHE_MODES",
    "NVFP4_BACKEND",
    "QuantRecipe",
    "build_recipe",
    "base_config",
    "kv_cache_entries",
    "resolve_nvfp4_backend",
]
