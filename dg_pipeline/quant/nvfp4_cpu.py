"""NVFP4 fake quantization in plain torch, registered as a ModelOpt quantization backend.

ModelOpt 0.47's NVFP4 fake-quant only runs on CUDA (`tensor_quant._dynamic_block_quantize_impl` asserts "amax must
be a CUDA tensor" and dispatches to a Triton/CUDA kernel). This module implements the same format with torch ops so
that calibration, the gate and tests run on a CPU, and plugs it in through ModelOpt's supported hook:
`register_quant_backend(NVFP4_BACKEND, ...)` plus the quantizer config field `backend` (recipes.py sets it).

Numerics (the same as ModelOpt's exporter `NVFP4QTensor`, modelopt/torch/quantization/qtensor/nvfp4_tensor.py):
- E2M1 magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}; round half to even; saturate at 6.
- per-tensor scale s2 = amax / (6 * 448) (weights: the weight's amax; activations: the static calibrated amax);
- per block of 16 along the last dim: s_b = block_amax / (6 * s2), 0 -> 1, clamp [2^-9, 448], cast to float8_e4m3fn;
- q = E2M1(x / (s_b * s2)); dequant = q * s_b * s2. Activation block scales are computed at run time (dynamic).

Known difference from ModelOpt's CUDA fake-quant kernel (fp4_kernel_hopper.py): that kernel does not clamp s_b up
to 2^-9 and replaces a block scale s_b * s2 below 1e-5 by 1.0, which flushes blocks with |x| < ~6e-5 (in units where
the tensor amax is ~1) to zero; the exporter and this emulation keep them. Everything else is bit-identical.
To compare on a GPU host: `python -m bench.quant_error --compare-cuda` reports the max abs difference between this
emulation and ModelOpt's CUDA path on random tensors (it prints "no GPU" on a CPU host).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dg_pipeline.core.errors import PipelineError

# The name recipes.py puts in the quantizer config's `backend` field; saved with the ModelOpt state, so a model
# restored with `mto.restore` needs `register_nvfp4_backend()` (done on `import dg_pipeline.quant`).
NVFP4_BACKEND = "dg_nvfp4_emulated"

E2M1_MAX = 6.0
E4M3_MAX = 448.0
BLOCK_SIZE = 16
# Smallest positive float8_e4m3fn (a subnormal): block scales are clamped up to it instead of flushing to 0.
E4M3_MIN_SUBNORMAL = 2.0**-9

# Representable E2M1 magnitudes (index = the 3-bit code) and the midpoints between neighbours.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def e2m1_code(magnitude: torch.Tensor) -> torch.Tensor:
    """3-bit E2M1 code (index into E2M1_VALUES) of non-negative values: nearest value, ties to the even code.

    The code is the number of midpoints passed; at a midpoint between codes k and k+1 it moves up only when k+1 is
    even (k odd), which is round-half-to-even. Above 5 every midpoint is passed: code 7 = 6.0 (saturation).
    """
    code = torch.zeros(magnitude.shape, dtype=torch.uint8, device=magnitude.device)
    for k, mid in enumerate(_E2M1_MIDPOINTS):
        code += (magnitude >= mid) if k % 2 else (magnitude > mid)
    return code


def e2m1_value(code: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(E2M1_VALUES, dtype=dtype, device=code.device)[code.long()]


def per_tensor_scale(amax: torch.Tensor) -> torch.Tensor:
    """s2 = amax / (6 * 448), float32 (exported as `weight_scale_2` / `input_scale`)."""
    return amax.float().reshape(()) / (E2M1_MAX * E4M3_MAX)


def block_scales(block_amax: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """Per-block scales s_b = block_amax / (6 * s2) as float8_e4m3fn (0 -> 1, clamped to [2^-9, 448])."""
    s_b = block_amax.float() / (E2M1_MAX * s2)
    s_b = torch.where(s_b == 0, torch.ones_like(s_b), s_b)
    return s_b.clamp(min=E4M3_MIN_SUBNORMAL, max=E4M3_MAX).to(torch.float8_e4m3fn)


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x as float32 (rows, n_blocks, block_size), zero-padded along the last dim (zeros never raise a block amax)."""
    pad = (-x.shape[-1]) % block_size
    flat = x.float().reshape(-1, x.shape[-1])
    if pad:
        flat = F.pad(flat, (0, pad))
    return flat.reshape(flat.shape[0], -1, block_size)


def quantize_nvfp4(x: torch.Tensor, amax: torch.Tensor, block_size: int = BLOCK_SIZE):
    """(codes, block_scale, s2): codes uint8 `sign << 3 | e2m1 code` shaped (rows, n_blocks, block_size),
    block_scale float8_e4m3fn (rows, n_blocks, 1), s2 float32 scalar."""
    s2 = per_tensor_scale(amax)
    blocks = _blocks(x, block_size)
    s_b = block_scales(blocks.abs().amax(dim=-1, keepdim=True), s2)
    scaled = blocks / (s_b.float() * s2)
    code = e2m1_code(scaled.abs())
    sign = (scaled < 0).to(torch.uint8) << 3
    return sign | code, s_b, s2


def dequantize_nvfp4(codes: torch.Tensor, block_scale: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """float32 values e2m1(q) * s_b * s2, same (rows, n_blocks, block_size) layout as `codes`."""
    magnitude = e2m1_value(codes & 0x7)
    signed = torch.where((codes & 0x8) != 0, -magnitude, magnitude)
    # One combined scale (s_b * s2), as the exported checkpoint is dequantized: bit-identical to NVFP4QTensor.
    return signed * (block_scale.float() * s2)


def fake_quant_nvfp4(x: torch.Tensor, amax: torch.Tensor, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """x rounded to NVFP4 and back (same shape and dtype as x), with per-tensor amax `amax`."""
    codes, s_b, s2 = quantize_nvfp4(x, amax, block_size)
    out = dequantize_nvfp4(codes, s_b, s2).reshape(-1, codes.shape[1] * block_size)
    out = out[:, : x.shape[-1]].reshape(x.shape)
    return out.to(x.dtype)


def _is_nvfp4_quantizer(quantizer) -> bool:
    bs = quantizer.block_sizes or {}
    return tuple(quantizer.num_bits) == (2, 1) and tuple(bs.get("scale_bits") or ()) == (4, 3)


def nvfp4_backend(inputs: torch.Tensor, quantizer) -> torch.Tensor:
    """ModelOpt backend entrypoint `(inputs, TensorQuantizer) -> fake-quantized inputs` for NVFP4 quantizers.

    The per-tensor amax is the quantizer's calibrated amax (weights: the weight's own amax); a quantizer without
    one (only possible before calibration finishes) uses the tensor's own amax, as ModelOpt does.
    """
    if not _is_nvfp4_quantizer(quantizer):
        raise PipelineError(
            f"quantizer backend {NVFP4_BACKEND!r} emulates NVFP4 only (num_bits (2, 1), E4M3 block scales), got "
            f"num_bits={quantizer.num_bits} block_sizes={quantizer.block_sizes}; remove `backend` from that entry"
        )
    bs = quantizer.block_sizes
    block_size = int(bs.get(-1) or bs.get(inputs.dim() - 1) or BLOCK_SIZE)
    amax = getattr(quantizer, "_amax", None)
    if amax is None or not torch.all(amax > 0):
        amax = inputs.detach().abs().amax()
    out = fake_quant_nvfp4(inputs.detach(), amax.to(inputs.device), block_size)
    # Straight-through estimator: the value is the fake-quantized one, the gradient passes unchanged.
    return inputs + (out - inputs).detach()


def register_nvfp4_backend() -> str:
    """Register the emulation with ModelOpt once per process (idempotent); returns the backend name."""
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import (
        is_registered_quant_backend,
        register_quant_backend,
    )

    if not is_registered_quant_backend(NVFP4_BACKEND):
        register_quant_backend(NVFP4_BACKEND, nvfp4_backend)
    return NVFP4_BACKEND
