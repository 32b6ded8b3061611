"""Load an exported directory back into DiffusionGemmaForBlockDiffusion in plain torch (no ModelOpt quantizers).

Quantized linears are dequantized (dequant.py), per-expert tensors are merged back into the fused 3-D parameters
the HF class holds, and the tied encoder weights come from the single stored (decoder) copy. The result is a
weight-only dequantized model: activation scales (input_scale) are not applied, so it matches the fake-quantized
model's weights exactly but not its activation rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
from transformers import DiffusionGemmaGenerationConfig

from dg_pipeline.core.errors import InputError
from dg_pipeline.core.manifest import MANIFEST, verify_manifest
from dg_pipeline.data.tokenizer import tokenizer_mismatch
from dg_pipeline.export.dequant import dequantize_linear
from dg_pipeline.export.formats import (
    GENERATION_CONFIG,
    PER_EXPERT,
    SCALE_LEAVES,
    CheckpointTensors,
    canonical_tied_name,
    quantized_format,
    read_quant_config,
    split_leaf,
)
from dg_pipeline.model.io import resolve_dtype
from dg_pipeline.model.structure import untied_backbone_weights
from dg_pipeline.settings.sampler import generation_config


@dataclass
class ReloadedExport:
    model: DiffusionGemmaForBlockDiffusion
    tokenizer: object
    path: Path
    quant_algo: str | None  # None: an unquantized export
    dequantized_linears: int  # quantized linears turned back into float weights (per expert counted once each)


def dequantized_state_dict(export_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[dict, int]:
    """The export's tensors as the HF class names and shapes them: float weights, fused 3-D experts, no scales."""
    tensors = CheckpointTensors(export_dir)
    state: dict[str, torch.Tensor] = {}
    dequantized = 0
    for module, leaves in tensors.modules().items():
        fmt = quantized_format(leaves)
        if fmt is not None:
            missing = [leaf for leaf in fmt.leaves if leaf not in leaves]
            if missing:
                raise InputError(f"{export_dir}: {module} is {fmt.algo} but lacks {missing}; run stage=check on it")
            values = {leaf: tensors.load(leaves[leaf].name) for leaf in fmt.leaves}
            state[f"{module}.weight"] = dequantize_linear(fmt, values, dtype)
            dequantized += 1
            continue
        for leaf, t in leaves.items():
            if leaf in SCALE_LEAVES:
                continue  # activation / KV-cache scales: not part of the HF model
            value = tensors.load(t.name)
            state[t.name] = value.to(dtype) if value.is_floating_point() else value
    return merge_per_expert(state, export_dir), dequantized


def merge_per_expert(state: dict[str, torch.Tensor], where: str | Path = "export") -> dict[str, torch.Tensor]:
    """experts.<E>.{gate,up,down}_proj.weight -> experts.gate_up_proj [E, 2I, H] (gate rows first, as the HF
    forward chunks them) and experts.down_proj [E, H, I]."""
    grouped: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        module, leaf = split_leaf(name)
        m = PER_EXPERT.match(module) if leaf == "weight" else None
        if m is None:
            out[name] = value
            continue
        grouped.setdefault(m["experts"], {}).setdefault(int(m["index"]), {})[m["proj"]] = value
    for experts, by_index in grouped.items():
        indices = sorted(by_index)
        if indices != list(range(len(indices))):
            raise InputError(f"{where}: {experts} has experts {indices}; expected 0..{len(indices) - 1} without gaps")
        for e in indices:
            absent = {"gate_proj", "up_proj", "down_proj"} - set(by_index[e])
            if absent:
                raise InputError(f"{where}: {experts}.{e} lacks {sorted(absent)}")
        out[f"{experts}.gate_up_proj"] = torch.stack(
            [torch.cat([by_index[e]["gate_proj"], by_index[e]["up_proj"]], dim=0) for e in indices]
        )
        out[f"{experts}.down_proj"] = torch.stack([by_index[e]["down_proj"] for e in indices])
    return out


def load_export(
    export_dir: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu", verify: bool = True
) -> ReloadedExport:
    """The exported model as a plain DiffusionGemmaForBlockDiffusion (eval mode) with its tokenizer.

    verify: check manifest.json first (always, except inside the export stage before it is written).
    """
    export_dir = Path(export_dir)
    if verify:
        verify_manifest(export_dir)
    torch_dtype = resolve_dtype(dtype, key="dtype")
    config = DiffusionGemmaConfig.from_pretrained(export_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized; no HF quantizer applies
    state, dequantized = dequantized_state_dict(export_dir, torch.float32)
    model = DiffusionGemmaForBlockDiffusion._from_config(config, dtype=torch.float32)
    result = model.load_state_dict(state, strict=False)
    _check_loaded(export_dir, state, result.missing_keys, result.unexpected_keys)
    untied = untied_backbone_weights(model)
    if untied:
        raise InputError(f"{export_dir}: encoder and decoder weights are not shared after loading ({untied[:3]})")
    model = model.to(device=device, dtype=torch_dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    mismatch = tokenizer_mismatch(tokenizer, export_dir)
    if mismatch:
        raise InputError(mismatch)
    if (export_dir / GENERATION_CONFIG).exists():
        model.generation_config = generation_config(
            tokenizer, base=DiffusionGemmaGenerationConfig.from_pretrained(export_dir), model_config=config
        )
    quant = read_quant_config(export_dir)
    return ReloadedExport(model, tokenizer, export_dir, (quant or {}).get("quant_algo"), dequantized)


@dataclass
class EvalModel:
    model: DiffusionGemmaForBlockDiffusion
    tokenizer: object
    kind: str  # what the dir is and how it was loaded (printed, and recorded in verify.json)
    simulated: bool = False  # fake-quantized: its tokens/s simulate quantization, they are not a deployment figure


def load_for_eval(path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu") -> EvalModel:
    """Any dir the pipeline writes, loaded the way its own gate evaluates it:
    a quantize output (quant.json): the ModelOpt state restored onto its base model, weights folded (fake-quant);
    a quantized export (FP8 / NVFP4 / NVFP4 experts-only): its manifest verified (a foreign checkpoint without one
      loads unverified), weights dequantized in plain torch;
    a model dir or bf16 export: loaded as is (a release manifest, when present, verified first)."""
    from dg_pipeline.model.io import load_model
    from dg_pipeline.quant import QUANT_JSON, fold_weights_for_eval, restore_quantized

    path = Path(path)
    if (path / QUANT_JSON).is_file():
        model, tokenizer, record = restore_quantized(path, device=device)
        fold_weights_for_eval(model)
        return EvalModel(model, tokenizer, f"quantize output ({record.get('format')}, fake-quantized)", True)
    if read_quant_config(path) is not None:
        verify = (path / MANIFEST).is_file()
        reloaded = load_export(path, dtype=dtype, device=device, verify=verify)
        checked = "manifest verified" if verify else f"no {MANIFEST}: files not verified"
        return EvalModel(reloaded.model, reloaded.tokenizer,
                         f"{reloaded.quant_algo} export (weights dequantized in plain torch; {checked})")
    model, tokenizer = load_model(path, dtype=dtype, device=device)
    return EvalModel(model, tokenizer, "model dir")


def _check_loaded(export_dir: Path, state: dict, missing: list[str], unexpected: list[str]) -> None:
    # Tied aliases (encoder text weights, lm_head) are filled by their stored decoder copy.
    absent = [k for k in missing if canonical_tied_name(k) not in state and k != "lm_head.weight"]
    if absent or unexpected:
        parts = []
        if absent:
            parts.append(f"lacks {len(absent)} tensors (e.g. {', '.join(absent[:3])})")
        if unexpected:
            parts.append(f"has {len(unexpected)} tensors the model does not (e.g. {', '.join(unexpected[:3])})")
        raise InputError(f"{export_dir}: the export {' and '.join(parts)}; run `stage=check input={export_dir}`")
