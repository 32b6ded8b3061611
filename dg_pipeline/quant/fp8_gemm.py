"""Real FP8 GEMMs for an FP8-calibrated model, so the gate's tokens/s on Hopper+ are honest next to bf16.

ModelOpt's fake quantization rounds weights and inputs to FP8 but still multiplies in bf16/fp32. `swap_in_fp8_gemms`
replaces each FP8-quantized linear (ModelOpt `QuantLinear` with per-tensor E4M3 weight and input quantizers) by an
`FP8Linear` holding the weight as float8_e4m3fn with its calibrated scale:
    w_scale = weight_amax / 448, w_fp8 = E4M3(W / w_scale);   x_scale = input_amax / 448, x_fp8 = E4M3(x / x_scale)
    y = (x_fp8 @ w_fp8^T) * x_scale * w_scale + b
computed by `torch._scaled_mm` on CUDA with compute capability >= 8.9, and by the same formula in float32 elsewhere
(the CPU fallback, which equals ModelOpt's fake-quant output up to summation order). Fused MoE experts keep
ModelOpt's fake quantization (they run per-expert `F.linear` calls, not module linears).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_MAX = 448.0
# torch._scaled_mm wants K and N multiples of 16 (and we pad M to it).
_SCALED_MM_ALIGN = 16


def fp8_gemm_supported(device: torch.device | str) -> bool:
    """Real FP8 matmuls: a CUDA device with compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def to_fp8(x: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 tensor, float32 scalar scale = amax / 448) with x ~= fp8 * scale (saturating at +-448)."""
    scale = (amax.detach().float().reshape(()) / FP8_MAX).to(x.device)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fp8_matmul_reference(x_fp8, x_scale, w_fp8, w_scale, bias=None, out_dtype=torch.float32) -> torch.Tensor:
    """The FP8 GEMM's numbers in float32: (x_fp8 @ w_fp8^T) * (x_scale * w_scale) + bias."""
    out = (x_fp8.float() @ w_fp8.float().t()) * (x_scale * w_scale)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def fp8_matmul_scaled_mm(x_fp8, x_scale, w_fp8, w_scale, bias=None, out_dtype=torch.bfloat16) -> torch.Tensor:
    """torch._scaled_mm (CUDA, cc >= 8.9): x_fp8 (M, K) row-major, w_fp8 (N, K) -> (M, N) in out_dtype."""
    m = x_fp8.shape[0]
    pad = (-m) % _SCALED_MM_ALIGN
    if pad:
        x_fp8 = F.pad(x_fp8.view(torch.uint8), (0, 0, 0, pad)).view(torch.float8_e4m3fn)
    out = torch._scaled_mm(
        x_fp8, w_fp8.t(), scale_a=x_scale, scale_b=w_scale,
        bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
    )
    return out[:m]


class FP8Linear(nn.Module):
    """A linear layer running FP8 x FP8 with static per-tensor scales from ModelOpt calibration."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, weight_amax: torch.Tensor,
                 input_amax: torch.Tensor, use_scaled_mm: bool, weight_fp8: tuple | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w_fp8, w_scale = weight_fp8 if weight_fp8 is not None else to_fp8(weight.detach(), weight_amax)
        self.register_buffer("weight_fp8", w_fp8)
        self.register_buffer("weight_scale", w_scale)
        self.register_buffer("input_amax", input_amax.detach().float().reshape(()).to(weight.device))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        aligned = self.in_features % _SCALED_MM_ALIGN == 0 and self.out_features % _SCALED_MM_ALIGN == 0
        self.use_scaled_mm = bool(use_scaled_mm and aligned)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_fp8, x_scale = to_fp8(x.reshape(-1, shape[-1]), self.input_amax)
        matmul = fp8_matmul_scaled_mm if self.use_scaled_mm else fp8_matmul_reference
        out = matmul(x_fp8, x_scale, self.weight_fp8, self.weight_scale, self.bias, out_dtype=x.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scaled_mm={self.use_scaled_mm}"


def _is_fp8_per_tensor(q) -> bool:
    return (
        q is not None and q.is_enabled and tuple(q.num_bits) == (4, 3) and q.block_sizes is None
        and q.axis is None and getattr(q, "_amax", None) is not None and q.backend is None
    )


def fp8_linear_source(module: nn.Module) -> bool:
    """A ModelOpt-quantized nn.Linear with calibrated per-tensor FP8 weight and input quantizers."""
    output_quantizer = getattr(module, "output_quantizer", None)
    return (
        isinstance(module, nn.Linear)
        and _is_fp8_per_tensor(getattr(module, "weight_quantizer", None))
        and _is_fp8_per_tensor(getattr(module, "input_quantizer", None))
        and (output_quantizer is None or not output_quantizer.is_enabled)
    )


@torch.no_grad()
def swap_in_fp8_gemms(model: nn.Module, use_scaled_mm: bool | None = None) -> list[str]:
    """Replace every FP8-quantized linear of `model` by an FP8Linear (in place); returns the replaced names.

    use_scaled_mm: None = when the model's device supports it (fp8_gemm_supported). Tied encoder/decoder linears
    share one FP8 weight copy.
    """
    if use_scaled_mm is None:
        use_scaled_mm = fp8_gemm_supported(next(model.parameters()).device)
    shared: dict[int, tuple] = {}
    replaced = []
    for name, module in list(model.named_modules()):
        if not fp8_linear_source(module):
            continue
        w, wq = module.weight, module.weight_quantizer
        key = w.data_ptr()
        if key not in shared:
            shared[key] = to_fp8(w.detach(), wq._amax)
        fp8 = FP8Linear(w, module.bias, wq._amax, module.input_quantizer._amax, use_scaled_mm, weight_fp8=shared[key])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fp8)
        replaced.append(name)
    return replaced
