"""Fused linears share their scales: what the engine runs as one GEMM is calibrated as one tensor.

vLLM runs q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj` (per MoE expert: w13) with ONE weight scale and
ONE input scale. An FP8 checkpoint whose shards carry different scales is re-quantized at load to the largest one
(each shard dequantized with its own scale, then rounded again with the max): a second, lossy rounding that no gate
here ever measured. NVFP4 loaders need one weight_scale_2 per group (TensorRT-LLM asserts it; vLLM takes the gate's
for gate and up). So calibration ends by giving every member of a fused group (dg_pipeline.model.vllm_contract
.fused_group) the group's max weight amax and max input amax: the weights are then rounded once, from the float
weights, with the very scale the engine uses, and the quantize gate measures that model.

(Fused MoE experts already hold one weight quantizer per expert for gate+up and one input quantizer per layer.)
"""

from __future__ import annotations

import torch
from torch import nn

from dg_pipeline.model.vllm_contract import fused_group

QUANTIZER_ATTRS = ("weight_quantizer", "input_quantizer")


def _scalar_static(q) -> bool:
    """An enabled quantizer with one calibrated range (per-tensor amax) that a loader turns into one scale."""
    amax = getattr(q, "_amax", None)
    return (
        q is not None and q.is_enabled and not q._dynamic and not getattr(q, "_use_constant_amax", False)
        and amax is not None and amax.numel() == 1
    )


def fused_quantizer_groups(model: nn.Module) -> dict[str, list[nn.Module]]:
    """group key -> the quantized linears of that fused group (q/k/v of one attention, gate/up of one MLP)."""
    groups: dict[str, list[nn.Module]] = {}
    for name, module in model.named_modules():
        group = fused_group(name)
        if group is not None and any(getattr(module, a, None) is not None for a in QUANTIZER_ATTRS):
            groups.setdefault(group[0], []).append(module)
    return groups


@torch.no_grad()
def share_fused_scales(model: nn.Module) -> dict:
    """Set each fused group's weight and input amax to the group's max (idempotent); returns the quant.json
    `fused` block: groups seen, quantizer sets changed, and the largest relative scale change it made."""
    groups = fused_quantizer_groups(model)
    changed, largest = 0, 0.0
    for members in groups.values():
        for attr in QUANTIZER_ATTRS:
            quantizers = [getattr(m, attr, None) for m in members]
            if len(quantizers) < 2 or not all(_scalar_static(q) for q in quantizers):
                continue
            values = torch.stack([q._amax.float().reshape(()) for q in quantizers])
            amax = values.max()
            if bool((values < amax).any()):
                changed += 1
                largest = max(largest, float(((amax - values) / amax).max()))
            for q in quantizers:
                q.amax = amax.to(q._amax.device, q._amax.dtype).reshape(q._amax.shape)
    return {"groups": len(groups), "changed": changed, "max_relative_change": largest}


__all__ = ["fused_quantizer_groups", "share_fused_scales"]
