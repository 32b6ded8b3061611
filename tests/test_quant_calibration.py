"""Calibration of a real tiny DiffusionGemma with real ModelOpt: loops, tied streams, experts, audit, recipes."""

import copy

import pytest
import torch

from dg_pipeline.core.errors import InputError, PipelineError
from dg_pipeline.data import generate_boards, sudoku_examples
from dg_pipeline.data.tokenizer import build_board_tokenizer
from dg_pipeline.model import build_config, build_model
from dg_pipeline.quant import (
    NVFP4_BACKEND,
    LogitsErrorProbe,
    build_recipe,
    calibrate,
    diffusion_forward_loop,
    fold_weights_for_eval,
    sync_tied_quantizers,
    text_forward_loop,
    tied_amax_mismatches,
    uncovered_summary,
)
from dg_pipeline.quant.tied import tied_quantizer_pairs
from dg_pipeline.sampling import SamplerConfig

STEPS = 6  # denoising steps per calibration block: enough to visit several noise levels, fast on a CPU


@pytest.fixture(scope="module")
def tokenizer():
    return build_board_tokenizer()


@pytest.fixture(scope="module")
def examples(tokenizer):
    return sudoku_examples(generate_boards(4, 8, 4, 10, seed=0), tokenizer)


@pytest.fixture(scope="module")
def base_model(tokenizer):
    return build_model("tiny", tokenizer, canvas_length=32, seed=0)


@pytest.fixture
def model(base_model):
    return copy.deepcopy(base_model)


def diffusion_loop(model, examples, pad_id=0):
    sampler = SamplerConfig.for_model(model, max_denoising_steps=STEPS)
    return diffusion_forward_loop(examples, pad_id, sampler, batch_size=4, max_new_tokens=17, seed=0)


def enabled_quantizers(model):
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {n: q for n, q in model.named_modules() if isinstance(q, TensorQuantizer) and q.is_enabled}


def test_diffusion_loop_runs_prefill_canvas_and_self_conditioned_passes_and_calibrates_everything(model, examples):
    result = calibrate(model, build_recipe("fp8"), diffusion_loop(model, examples))
    p = result.passes
    assert p["encoder_passes"] >= 2 and p["decoder_passes"] >= 2 * STEPS - 2  # 2 batches, adaptive stop may end early
    assert p["self_conditioned_passes"] >= p["decoder_passes"] - 2  # every step after a block's first
    assert result.quantizers["enabled"] == result.quantizers["calibrated"] > 0
    assert tied_amax_mismatches(model) == []
    assert result.seconds > 0 and result.experts["coverage"] == 1.0


def test_text_loop_never_runs_a_self_conditioned_pass(model, examples):
    loop = text_forward_loop(examples, 0, model.config.canvas_length, batch_size=4, max_length=64)
    result = calibrate(model, build_recipe("fp8"), loop)
    assert result.passes["self_conditioned_passes"] == 0
    assert result.passes["decoder_passes"] == 2  # one random canvas per batch


def test_stock_fp8_with_a_text_loop_leaves_self_conditioning_at_amax_zero_and_the_audit_names_it(model, examples):
    """The cause of the 0.29 logits error: zero-amax self-conditioning quantizers clamp their inputs to [-1, 1]."""
    loop = text_forward_loop(examples, 0, model.config.canvas_length, batch_size=4, max_length=64)
    with pytest.raises(PipelineError, match=r"self_conditioning\.\w+_proj\.input_quantizer .*saw only zeros"):
        calibrate(model, build_recipe("fp8", self_conditioning=True), loop)


def test_diffusion_loop_calibrates_self_conditioning_when_it_is_quantized(model, examples):
    calibrate(model, build_recipe("fp8", self_conditioning=True), diffusion_loop(model, examples))
    sc = {n: q for n, q in enabled_quantizers(model).items() if "self_conditioning" in n}
    assert len(sc) == 6 and all(float(q.amax) > 0 for q in sc.values())


def test_tied_encoder_and_decoder_quantizers_end_with_the_max_of_both_streams(model, examples):
    import modelopt.torch.quantization as mtq

    mtq.quantize(model, build_recipe("fp8").config, diffusion_loop(model, examples))
    before = {enc: (q_enc.amax.clone(), q_dec.amax.clone()) for enc, q_enc, _, q_dec in tied_quantizer_pairs(model)
              if q_enc.is_enabled}
    assert any(not torch.equal(a, b) for name, (a, b) in before.items() if "input_quantizer" in name)
    sync_tied_quantizers(model)
    for enc, q_enc, dec, q_dec in tied_quantizer_pairs(model):
        if enc in before:
            expected = torch.maximum(*before[enc])
            assert torch.equal(q_enc.amax, expected) and torch.equal(q_dec.amax, expected), enc
    assert tied_amax_mismatches(model) == []


def test_experts_a_tiny_calibration_set_cannot_reach_are_listed_and_calibrated_by_the_rule(tokenizer, examples):
    config = build_config("tiny", len(tokenizer), canvas_length=4)
    config.text_config.num_experts = 16  # 2 tokens x top-2 per stream cannot reach 16 experts
    torch.manual_seed(0)
    from transformers import DiffusionGemmaForBlockDiffusion

    model = DiffusionGemmaForBlockDiffusion(config).eval()
    loop = text_forward_loop(examples[:1], 0, 4, batch_size=1, max_length=2)
    result = calibrate(model, build_recipe("fp8"), loop)

    uncovered = result.experts["uncovered"]
    assert uncovered and result.experts["coverage"] < 1.0
    assert {"layer", "expert", "encoder", "decoder"} <= set(uncovered[0])
    # the console warning is one count per layer, not one name per expert (the names stay in quant.json)
    per_layer = {layer: sum(u["layer"] == layer for u in uncovered) for layer in (0, 1)}
    assert uncovered_summary(result.experts) == ", ".join(
        f"layer {layer}: {n}/16" for layer, n in per_layer.items() if n)
    for u in uncovered:
        for stream in ("model.encoder.language_model", "model.decoder"):
            experts = model.get_submodule(f"{stream}.layers.{u['layer']}.experts")
            for proj in ("gate_up_proj", "down_proj"):
                q = getattr(experts, f"{proj}_weight_quantizers")[u["expert"]]
                assert torch.equal(q.amax, getattr(experts, proj)[u["expert"]].abs().amax())
                shared_input = getattr(experts, f"{proj}_input_quantizer")
                assert float(shared_input.amax) > 0  # the layer's range, from the experts that saw tokens
    assert result.quantizers["enabled"] == result.quantizers["calibrated"]


def test_nvfp4_calibrates_on_cpu_through_the_emulated_backend_and_errs_more_than_fp8(base_model, examples):
    prompts = [e.prompt_ids for e in examples[:2]]
    errors = {}
    for name in ("fp8", "nvfp4"):
        model = copy.deepcopy(base_model)
        probe = LogitsErrorProbe(model, prompts)
        recipe = build_recipe(name)
        result = calibrate(model, recipe, diffusion_loop(model, examples[:4]))
        errors[name] = probe.error(model)["logits_relative_error"]
        assert result.quantizers["enabled"] == result.quantizers["calibrated"]
    assert recipe.nvfp4_backend == NVFP4_BACKEND
    assert 0 < errors["fp8"] < errors["nvfp4"] < 1.5


@pytest.mark.parametrize("name", ["fp8", "nvfp4"])
def test_folding_the_weights_for_the_gate_keeps_every_logit_bit_for_bit(base_model, examples, name):
    model = copy.deepcopy(base_model)
    calibrate(model, build_recipe(name), diffusion_loop(model, examples[:4]))
    prompt = torch.tensor([examples[0].prompt_ids])
    canvas = torch.randint(0, 16, (1, 32), generator=torch.Generator().manual_seed(0))
    first = model(input_ids=prompt, decoder_input_ids=canvas).logits
    conditioned = model(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=first).logits

    folded = fold_weights_for_eval(model)

    weight_quantizers = [n for n in enabled_quantizers(model) if "weight_quantizer" in n]
    assert folded > 0 and weight_quantizers == []  # per-expert ones included, tied layers folded twice
    assert torch.equal(model(input_ids=prompt, decoder_input_ids=canvas).logits, first)
    assert torch.equal(
        model(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=first).logits, conditioned
    )


def test_experts_only_recipe_quantizes_only_the_experts_and_casts_the_kv_cache(model, examples):
    recipe = build_recipe("nvfp4_experts_only", "fp8_cast")
    result = calibrate(model, recipe, diffusion_loop(model, examples[:4]))
    enabled = enabled_quantizers(model)
    assert enabled and all(".experts." in n or n.endswith(("k_bmm_quantizer", "v_bmm_quantizer")) for n in enabled)
    assert result.quantizers["constant_amax"] == 4 * model.config.text_config.num_hidden_layers  # k, v x 2 streams
    assert "model.decoder.layers.*.self_attn.q_proj" in result.excluded_modules


def test_bad_quant_settings_name_the_key():
    with pytest.raises(InputError, match="quant.name=int3"):
        build_recipe("int3")
    with pytest.raises(InputError, match="quant.kv_cache=fp4"):
        build_recipe("fp8", "fp4")
    with pytest.raises(InputError, match="quant.nvfp4_backend=modelopt"):
        build_recipe("nvfp4", nvfp4_backend="modelopt", device="cpu")
