"""Real-FP8 linears (dg_pipeline/quant/fp8_gemm.py): the scale math and the CPU fallback against ModelOpt's fake quant."""


import pytest
import torch
from torch import nn

from dg_pipeline.data.tokenizer import build_board_tokenizer
from dg_pipeline.model import build_model
from dg_pipeline.quant import build_recipe, fp8_gemm_supported, swap_in_fp8_gemms
from dg_pipeline.quant.fp8_gemm import FP8Linear, fp8_linear_source, fp8_matmul_reference, to_fp8


def calibrated_fp8_linear(seed=0):
    import modelopt.torch.quantization as mtq

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 32))
    x = torch.randn(10, 64) * 3
    mtq.quantize(net, build_recipe("fp8").config, lambda m: m(x))
    return net, x


def test_weight_conversion_reproduces_modelopts_fp8_weight_rounding_exactly():
    net, _ = calibrated_fp8_linear()
    linear = net[0]
    w_fp8, w_scale = to_fp8(linear.weight, linear.weight_quantizer.amax)
    assert w_fp8.dtype == torch.float8_e4m3fn
    assert w_scale.item() == pytest.approx(linear.weight_quantizer.amax.item() / 448)
    assert torch.equal(w_fp8.float() * w_scale, linear.weight_quantizer(linear.weight))


def test_fp8_linear_cpu_fallback_matches_the_fake_quantized_linear():
    net, x = calibrated_fp8_linear()
    expected = net(x)
    fp8 = FP8Linear(net[0].weight, net[0].bias, net[0].weight_quantizer.amax, net[0].input_quantizer.amax,
                    use_scaled_mm=False)
    torch.testing.assert_close(fp8(x), expected, rtol=1e-5, atol=1e-6)


def test_reference_matmul_applies_both_scales_and_the_bias():
    x_fp8 = torch.tensor([[1.0, 2.0]]).to(torch.float8_e4m3fn)
    w_fp8 = torch.tensor([[3.0, -1.0]]).to(torch.float8_e4m3fn)
    out = fp8_matmul_reference(x_fp8, torch.tensor(0.5), w_fp8, torch.tensor(0.25), torch.tensor([1.0]))
    assert out.item() == (1 * 3 - 2 * 1) * 0.5 * 0.25 + 1.0


def test_swapping_a_calibrated_model_keeps_its_logits_and_shares_tied_weights():
    import modelopt.torch.quantization as mtq

    tokenizer = build_board_tokenizer()
    model = build_model("tiny", tokenizer, canvas_length=8, seed=0)
    ids = torch.randint(6, 16, (2, 12), generator=torch.Generator().manual_seed(0))
    canvas = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(1))
    mtq.quantize(model, build_recipe("fp8").config, lambda m: m(input_ids=ids, decoder_input_ids=canvas))
    fake_quant = model(input_ids=ids, decoder_input_ids=canvas).logits
    sources = [n for n, m in model.named_modules() if fp8_linear_source(m)]

    replaced = swap_in_fp8_gemms(model, use_scaled_mm=False)
    assert replaced == sources and len(replaced) > 0
    torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=canvas).logits, fake_quant, rtol=1e-4, atol=1e-4)
    enc = model.get_submodule("model.encoder.language_model.layers.0.self_attn.q_proj")
    dec = model.get_submodule("model.decoder.layers.0.self_attn.q_proj")
    assert isinstance(enc, FP8Linear) and enc.weight_fp8.data_ptr() == dec.weight_fp8.data_ptr()


def test_real_fp8_gemms_only_on_cuda_with_compute_capability_8_9():
    assert not fp8_gemm_supported("cpu")
