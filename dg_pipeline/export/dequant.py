"""Exported quantized linears back to plain float weights, in plain torch: our own unpacking, not ModelOpt's
QTensor dequantizers, so a packing mistake in ModelOpt's writer is not mirrored by the reader (tests pin the two
to agree bit for bit on well-formed data).

FP8:   w = fp8.float() * weight_scale                          (per-tensor scale)
NVFP4: w = e2m1(unpack(uint8)) * (weight_scale[block] * weight_scale_2)
       (two E2M1 codes per byte, low nibble = even input index; fp8 block scales over 16 inputs)
Activation scales (input_scale) are not applied: a reload is weight-only dequantized.
"""

from __future__ import annotations

import torch

from dg_pipeline.export.formats import FP8, NVFP4, LinearFormat
from dg_pipeline.quant.nvfp4_cpu import dequantize_nvfp4 as dequantize_nvfp4_blocks


def dequantize_fp8(weight: torch.Tensor, weight_scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (weight.to(torch.float32) * weight_scale.to(torch.float32)).to(dtype)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """(out, in / 2) uint8 -> (out, in) 4-bit codes `sign << 3 | magnitude code`, low nibble first."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def dequantize_nvfp4(
    packed: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor, dtype=torch.float32
) -> torch.Tensor:
    out_features = packed.shape[0]
    codes = unpack_e2m1(packed.view(torch.uint8)).reshape(out_features, -1, NVFP4.group_size)
    block_scale = weight_scale.reshape(out_features, -1, 1)
    values = dequantize_nvfp4_blocks(codes, block_scale, weight_scale_2.to(torch.float32).reshape(()))
    return values.reshape(out_features, -1).to(dtype)


def dequantize_linear(fmt: LinearFormat, tensors: dict[str, torch.Tensor], dtype=torch.float32) -> torch.Tensor:
    """The float weight of one exported linear, given its tensors by leaf name (weight, weight_scale, ...)."""
    if fmt is FP8:
        return dequantize_fp8(tensors["weight"], tensors["weight_scale"], dtype)
    if fmt is NVFP4:
        return dequantize_nvfp4(tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"], dtype)
    raise ValueError(f"no dequantizer for {fmt.algo}")
