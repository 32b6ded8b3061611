"""Writers of the release checkpoint: ModelOpt's unified Hugging Face checkpoint (quantized) and plain HF (bf16).

`export_quantized` runs `modelopt.torch.export.export_hf_checkpoint` on a ModelOpt-quantized
DiffusionGemmaForBlockDiffusion, then completes what it leaves for a deployable DiffusionGemma bundle: the
exclude list (self-conditioning and embeddings are kept unquantized but ModelOpt only lists modules it attached a
quantizer to), the unquantized tensors in the release dtype, the sampler's generation_config.json and the tokenizer.
`export_unquantized` writes the same bundle without quantization (an unquantized release).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import io
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dg_pipeline.core.errors import InputError, PipelineError
from dg_pipeline.core.io import atomic_write_json, read_json
from dg_pipeline.data.tokenizer import save_tokenizer
from dg_pipeline.export.formats import (
    ARCHITECTURE,
    FORMAT_BY_WEIGHT_DTYPE,
    HF_QUANT_CONFIG,
    KEEP_UNQUANTIZED,
    SCALE_LEAVES,
    CheckpointTensors,
    matches_module,
    quantized_format,
)
from dg_pipeline.model.vllm_contract import complete_engine_attributes
from dg_pipeline.settings.sampler import SamplerSettings, generation_config, read_sampler_settings


@dataclass
class ExportResult:
    path: Path
    quant_algo: str | None  # None for an unquantized export
    added_exclusions: list[str]


def release_generation_config(model, tokenizer, settings: SamplerSettings | None = None):
    """What a release's generation_config.json carries: the model's sampler keys and token ids (unset ones from
    the defaults), with the run's non-null `sampler.*` keys applied; nothing else of the model's config."""
    own = read_sampler_settings(getattr(model, "generation_config", None))
    return generation_config(tokenizer, model_config=model.config, **{**own, **(settings.generation_overrides() if settings else {})})


# ------------------------------------------------------------------------------------------ the probe forward


@contextlib.contextmanager
def decoder_config_isolated(model):
    """Give the decoder its own (shallow) copy of the model config while ModelOpt exports.

    Why: export_hf_checkpoint -> requantize_resmooth_fused_llm_layers runs a probe forward (`model(ones[1, 2])`)
    to find linears that share an input, inside modelopt's `_disable_use_cache`, which sets `use_cache=False` on
    model.config. DiffusionGemmaConfig has no `use_cache` at all; once set, the decoder's
    `merge_with_config_defaults` turns the non-None config value into a `use_cache=False` kwarg, and
    DiffusionGemmaDecoderModel.forward rejects any `use_cache` ("always uses a cache"). The decoder reads its
    shapes from the shared text_config, so a private top-level copy changes nothing else.
    """
    decoder = model.model.decoder
    shared = decoder.config
    decoder.config = copy.copy(shared)
    try:
        yield
    finally:
        decoder.config = shared


# ModelOpt logs one warning per tied alias it drops (every encoder weight of DiffusionGemma: expected, not news).
_TIED_ALIAS_LOGGER = "modelopt.torch.export.quant_utils"


@contextlib.contextmanager
def _quiet_modelopt():
    """Hold back ModelOpt's per-module chatter (stdout, tied-alias log lines); show the stdout part on failure."""
    buffer = io.StringIO()
    log = logging.getLogger(_TIED_ALIAS_LOGGER)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    except BaseException:
        sys.stdout.write(buffer.getvalue())
        raise
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def _expected_warnings_silenced():
    """Warnings ModelOpt emits on every export of a float32-calibrated model released in bf16 (intended here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Model's original dtype")
        warnings.filterwarnings("ignore", message="To copy construct from a tensor")
        yield


# ---------------------------------------------------------------------------------------------- the writers


def export_quantized(
    model, tokenizer, out_dir: str | Path, generation_config, dtype: torch.dtype = torch.bfloat16,
    share_fused: bool = True,
) -> ExportResult:
    """ModelOpt's unified HF checkpoint of a quantized model into `out_dir` (an existing, empty dir).

    The model is consumed: ModelOpt replaces its weights by the quantized ones in place. Fused q/k/v and gate/up
    groups get one scale each first (dg_pipeline.quant.fused; a no-op on a model calibrated by this pipeline, the
    fix for an older quantize output); share_fused=False keeps per-shard scales (only to measure the difference).
    """
    from modelopt.torch.export import export_hf_checkpoint
    from modelopt.torch.export.quant_utils import has_quantized_modules

    from dg_pipeline.quant.fused import share_fused_scales

    if not has_quantized_modules(model):
        raise InputError(
            "the input model has no enabled quantizers: export it with export.format=bf16, or quantize it first "
            "(stage=quantize)"
        )
    out_dir = Path(out_dir)
    model.config.architectures = [ARCHITECTURE]
    complete_engine_attributes(model.config)  # ModelOpt writes config.json from model.config
    if share_fused:
        share_fused_scales(model)
    try:
        with decoder_config_isolated(model), _quiet_modelopt(), _expected_warnings_silenced(), torch.no_grad():
            export_hf_checkpoint(model, dtype=dtype, export_dir=out_dir)
    except (AssertionError, AttributeError, NotImplementedError, ValueError) as e:
        raise PipelineError(f"ModelOpt export failed: {type(e).__name__}: {e}") from e
    quant = read_json(out_dir / HF_QUANT_CONFIG)
    cast_unquantized_tensors(out_dir, dtype)
    added = complete_exclusions(out_dir)
    _finish_bundle(out_dir, tokenizer, generation_config, dtype)
    return ExportResult(out_dir, quant["quantization"]["quant_algo"], added)


def export_unquantized(
    model, tokenizer, out_dir: str | Path, generation_config, dtype: torch.dtype = torch.bfloat16
) -> ExportResult:
    """A plain HF checkpoint (weights in `dtype`) with the same generation config and tokenizer files."""
    from dg_pipeline.model.io import save_model

    out_dir = Path(out_dir)
    save_model(model.to(dtype), tokenizer, out_dir, generation_config)
    _finish_bundle(out_dir, tokenizer, generation_config, dtype)
    return ExportResult(out_dir, None, [])


def _finish_bundle(out_dir: Path, tokenizer, generation_config, dtype: torch.dtype) -> None:
    generation_config.save_pretrained(out_dir)  # replaces the (null-valued) one save_pretrained wrote
    save_tokenizer(tokenizer, out_dir)  # export_hf_checkpoint saves no tokenizer
    config = read_json(out_dir / "config.json")
    config["architectures"] = [ARCHITECTURE]
    config["dtype"] = str(dtype).removeprefix("torch.")  # what serving engines default the model dtype to
    atomic_write_json(out_dir / "config.json", config)


# ------------------------------------------------------------------------------------------ post-processing


def cast_unquantized_tensors(out_dir: Path, dtype: torch.dtype) -> None:
    """Cast every unquantized floating tensor to the release dtype; quantized weights and scales keep theirs.

    ModelOpt's `dtype` argument only applies to the quantized modules' outputs; norms, embeddings, routers and
    the vision tower are written in the model's own (calibration) dtype.
    """
    tensors = CheckpointTensors(out_dir)
    keep = set()
    for module, leaves in tensors.modules().items():
        if quantized_format(leaves) is not None:
            keep.update(t.name for t in leaves.values())
        keep.update(t.name for leaf, t in leaves.items() if leaf in SCALE_LEAVES)
    for file in tensors.files:
        path = out_dir / file
        state = load_file(path)
        changed = False
        for name, t in state.items():
            if name not in keep and t.is_floating_point() and t.dtype not in FORMAT_BY_WEIGHT_DTYPE and t.dtype != dtype:
                state[name] = t.to(dtype)
                changed = True
        if changed:
            save_file(state, path, metadata={"format": "pt"})


def complete_exclusions(out_dir: Path) -> list[str]:
    """Add every stored, unquantized module that must stay unquantized to exclude_modules (hf_quant_config.json
    and config.json's quantization_config.ignore). Returns the patterns added.

    ModelOpt lists only modules it attached a quantizer to (plus routers), so self-conditioning (disabled by the
    quantize recipe) and the embeddings (not linears) are missing; a loader would then expect scales for them.
    """
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    hf_quant = read_json(out_dir / HF_QUANT_CONFIG)
    quantization = hf_quant["quantization"]
    exclude = list(quantization.get("exclude_modules") or [])
    added: list[str] = []
    for module, leaves in CheckpointTensors(out_dir).modules().items():
        weight = leaves.get("weight")
        if weight is None or len(weight.shape) != 2 or quantized_format(leaves) is not None:
            continue
        pattern = _exclusion_pattern(module)
        if pattern and not matches_module(module, exclude + added):
            added.append(pattern)
    if added:
        quantization["exclude_modules"] = sorted(set(exclude + added))
        atomic_write_json(out_dir / HF_QUANT_CONFIG, hf_quant)
        config = read_json(out_dir / "config.json")
        config["quantization_config"] = convert_hf_quant_config_format(hf_quant)
        atomic_write_json(out_dir / "config.json", config)
    return added


def _exclusion_pattern(module: str) -> str | None:
    """The exclude_modules entry covering `module`'s keep-unquantized part: 'model.decoder.self_conditioning*'
    for model.decoder.self_conditioning.gate_proj, 'model.decoder.embed_tokens' for the embeddings."""
    parts = module.split(".")
    for pattern, _ in KEEP_UNQUANTIZED:
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if fnmatch.fnmatchcase(prefix, pattern):
                return prefix if i == len(parts) else prefix + "*"
    return None


def describe_export(out_dir: str | Path) -> dict[str, Any]:
    """A short summary for logs and the model card: quant algo, kv-cache algo, excluded modules, sizes."""
    out_dir = Path(out_dir)
    tensors = CheckpointTensors(out_dir)
    quant = read_json(out_dir / HF_QUANT_CONFIG)["quantization"] if (out_dir / HF_QUANT_CONFIG).exists() else {}
    quantized = [m for m, leaves in tensors.modules().items() if quantized_format(leaves) is not None]
    return {
        "quant_algo": quant.get("quant_algo"),
        "kv_cache_quant_algo": quant.get("kv_cache_quant_algo"),
        "group_size": quant.get("group_size"),
        "exclude_modules": quant.get("exclude_modules", []),
        "quantized_linears": len(quantized),
        "tensors": len(tensors.tensors),
        "weight_bytes": sum(t.nbytes for t in tensors),
    }


__all__ = [
    "ExportResult",
    "release_generation_config",
    "decoder_config_isolated",
    "export_quantized",
    "export_unquantized",
    "cast_unquantized_tensors",
    "complete_exclusions",
    "describe_export",
]
