"""The NVFP4 emulation (dg_pipeline/quant/nvfp4_cpu.py): hand-computed values, ModelOpt's exporter, the backend hook."""

import pytest
import torch

from dg_pipeline.quant.nvfp4_cpu import (
    NVFP4_BACKEND,
    dequantize_nvfp4,
    e2m1_code,
    e2m1_value,
    fake_quant_nvfp4,
    quantize_nvfp4,
    register_nvfp4_backend,
)


def nvfp4_quantizer(backend=None):
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    cfg = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}
    if backend:
        cfg["backend"] = backend
    return TensorQuantizer(QuantizerAttributeConfig(**cfg))


def test_e2m1_rounds_to_nearest_with_ties_to_even_and_saturates_at_6():
    x = torch.tensor([0.0, 0.2, 0.25, 0.3, 0.75, 1.2, 1.25, 1.75, 2.5, 2.6, 3.5, 4.9, 5.0, 5.1, 6.0, 7.0, 1e6])
    expected = torch.tensor([0, 0, 0, 0.5, 1, 1, 1, 2, 2, 3, 4, 4, 4, 6, 6, 6, 6])
    assert torch.equal(e2m1_value(e2m1_code(x)), expected)


def test_block_scale_is_block_amax_over_6_s2_rounded_to_e4m3():
    # amax 2688 makes s2 = 2688 / (6 * 448) = 1 exactly, so block scales are plain numbers.
    amax = torch.tensor(2688.0)
    block = torch.zeros(16)
    block[:5] = torch.tensor([1.0, 0.5, -0.3, 0.09, 0.0])
    codes, s_b, s2 = quantize_nvfp4(block, amax)
    assert s2.item() == 1.0
    # s_b = 1 / 6 = 0.1667 = 1.333 * 2^-3 -> nearest E4M3 (3 mantissa bits) is 1.375 * 2^-3 = 0.171875
    assert s_b.float().item() == 0.171875
    out = dequantize_nvfp4(codes, s_b, s2).flatten()
    # x / 0.171875: 5.818 -> 6, 2.909 -> 3, -1.745 -> -1.5, 0.524 -> 0.5, 0 -> 0
    assert out[:5].tolist() == pytest.approx([6 * 0.171875, 3 * 0.171875, -1.5 * 0.171875, 0.5 * 0.171875, 0.0])
    # the code layout is sign << 3 | magnitude index: -1.5 is 0b1011
    assert codes.flatten()[2].item() == 0b1011


def test_zero_block_gets_scale_one_and_tiny_block_scale_is_clamped_to_2_pow_minus_9():
    amax = torch.tensor(2688.0)  # s2 = 1
    x = torch.zeros(32)
    x[16] = 1e-4  # block scale 1.7e-5 would flush to 0 in E4M3; it is clamped up to 2^-9 instead
    codes, s_b, _ = quantize_nvfp4(x, amax)
    assert s_b.float().flatten().tolist() == [1.0, 2.0**-9]
    assert torch.equal(fake_quant_nvfp4(x, amax), torch.zeros(32))  # 1e-4 / 2^-9 = 0.05 rounds to 0


def test_fake_quant_keeps_shape_and_dtype_and_pads_a_ragged_last_block():
    x = torch.randn(3, 5, 24, dtype=torch.bfloat16)
    out = fake_quant_nvfp4(x, x.float().abs().amax())
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    # the block holding the tensor's amax represents it exactly: s_b = 448 -> amax = 6 * 448 * s2
    i = x.float().abs().argmax()
    assert out.flatten()[i].float().abs().item() == pytest.approx(x.flatten()[i].float().abs().item(), rel=1e-2)


def test_emulation_is_bit_identical_to_modelopts_exporter():
    """What the CPU fake-quant simulates is exactly what export_hf_checkpoint stores (NVFP4QTensor)."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    gen = torch.Generator().manual_seed(0)
    for scale in (1e-3, 1.0, 50.0):
        x = torch.randn(32, 64, generator=gen) * torch.rand(32, 1, generator=gen) * scale
        x[1, :16] = 0.0
        packed, block_scale, s2 = NVFP4QTensor.quantize(x.clone(), 16)
        exported = packed.dequantize(dtype=torch.float32, scale=block_scale, double_scale=s2, block_sizes={-1: 16})
        assert torch.equal(fake_quant_nvfp4(x, x.abs().amax()), exported)


def test_modelopt_nvfp4_needs_cuda_and_the_registered_backend_runs_it_on_cpu():
    x = torch.randn(4, 32)
    stock = nvfp4_quantizer()
    stock.amax = x.abs().amax()
    with pytest.raises(AssertionError, match="CUDA"):
        stock(x)
    assert register_nvfp4_backend() == NVFP4_BACKEND
    emulated = nvfp4_quantizer(backend=NVFP4_BACKEND)
    emulated.amax = torch.tensor(10.0)  # the static (calibrated) per-tensor amax is the one used
    assert torch.equal(emulated(x), fake_quant_nvfp4(x, torch.tensor(10.0)))
