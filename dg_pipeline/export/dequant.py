"""Exported quantized linears back to plain float weights, with ModelOpt's own pure-torch dequantizers.

FP8:   w = fp8.float() * weight_scale                          (per-tensor scale)
NVFP4: w = e2m1(unpack(uint8)) * weight_scale[block] * weight_scale_2
       (two E2M1 values per byte, low nibble = even input index; fp8 block scales over 16 inputs)
Activation scales (input_scale) are not applied: a reload is weight-only dequantized.
"""

from __future__ import annotations

import torch
from modelopt.torch.quantization.qtensor import FP8QTensor, NVFP4QTensor

from dg_pipeline.export.formats import FP8, NVFP4, LinearFormat


def dequantize_fp8(weight: torch.Tensor, weight_scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    qtensor = FP8QTensor(weight.shape, dtype, weight)
    return qtensor.dequantize(dtype, scale=weight_scale.to(torch.float32))


def dequantize_nvfp4(
    packed: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor, dtype=torch.float32
) -> torch.Tensor:
    out_features, packed_in = packed.shape
    qtensor = NVFP4QTensor(torch.Size((out_features, packed_in * NVFP4.inputs_per_byte)), dtype, packed)
    return qtensor.dequantize(
        torch.float32,
        scale=weight_scale,
        double_scale=weight_scale_2.to(torch.float32),
        block_sizes={-1: NVFP4.group_size},
    ).to(dtype)


def dequantize_linear(fmt: LinearFormat, tensors: dict[str, torch.Tensor], dtype=torch.float32) -> torch.Tensor:
    """The float weight of one exported linear, given its tensors by leaf name (weight, weight_scale, ...)."""
    if fmt is FP8:
        return dequantize_fp8(tensors["weight"], tensors["weight_scale"], dtype)
    if fmt is NVFP4:
        return dequantize_nvfp4(tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"], dtype)
    raise ValueError(f"no dequantizer for {fmt.algo}")
