"""Specification of LoRA (dg_pipeline.training.lora): what is adapted, that the encoder and decoder share one
adapter per linear through training, and that merging gives back a plain DiffusionGemma with the same outputs."""

import pytest
import torch
from omegaconf import OmegaConf
from transformers import DiffusionGemmaForBlockDiffusion

from dg_pipeline.core.errors import InputError
from dg_pipeline.data.collate import collate
from dg_pipeline.data.examples import Example
from dg_pipeline.data.tokenizer import build_board_tokenizer
from dg_pipeline.model import build_config
from dg_pipeline.model.logits import encoder_causal_lm_logits
from dg_pipeline.objective import NoiseKey, UniformObjective
from dg_pipeline.training.lora import apply_lora, merge_lora
from dg_pipeline.training.module import BlockDiffusionModule, OptimConfig

CANVAS = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = OmegaConf.create({"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": TARGETS})


def lora_model():
    tok = build_board_tokenizer()
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(build_config("tiny", len(tok), CANVAS))
    return model, apply_lora(model, LORA), tok


def layer_pairs(model):
    return zip(model.model.encoder.language_model.layers, model.model.decoder.layers)


def test_only_attention_and_dense_mlp_linears_get_adapters_and_only_adapters_train():
    model, _, _ = lora_model()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == set(TARGETS)
    for name, _ in model.named_modules():
        if name.endswith(("router", "experts", "self_conditioning")) or "vision" in name:
            assert not any(n.startswith(name + ".lora_") for n in trainable), name
    # Experts' gate_up/down are 3-D Parameters, untouched; the router stays a plain Linear.
    layer = model.model.decoder.layers[0]
    assert isinstance(layer.experts.down_proj, torch.nn.Parameter)
    assert type(layer.router.proj) is torch.nn.Linear
    assert type(model.model.decoder.self_conditioning.gate_proj) is torch.nn.Linear


def test_encoder_and_decoder_share_one_adapter_per_linear_through_a_training_step():
    model, _, tok = lora_model()
    for enc, dec in layer_pairs(model):
        assert enc.self_attn.q_proj is dec.self_attn.q_proj
        assert enc.mlp.down_proj is dec.mlp.down_proj
    module = BlockDiffusionModule(model, UniformObjective(), OptimConfig(lr=1e-2, max_steps=2))
    optimizer = module.configure_optimizers()["optimizer"]
    examples = [Example([2, 6, 7, 8, 5], [9, 10, 11, 1], {}), Example([2, 9, 8, 5], [7, 6, 1], {})]
    batch = collate(examples, canvas_length=CANVAS, pad_id=tok.pad_token_id)
    before = encoder_causal_lm_logits(model, batch["input_ids"]).detach()
    module.objective.loss(model, batch, NoiseKey(0)).loss.backward()
    optimizer.step()
    x = torch.randn(3, model.config.text_config.hidden_size)
    for enc, dec in layer_pairs(model):
        assert enc.self_attn.q_proj.lora_B["default"].weight.abs().sum() > 0  # the adapter learned
        for name in ("q_proj", "k_proj", "o_proj"):
            assert torch.equal(getattr(enc.self_attn, name)(x), getattr(dec.self_attn, name)(x))
        for name in ("gate_proj", "up_proj"):
            assert torch.equal(getattr(enc.mlp, name)(x), getattr(dec.mlp, name)(x))
    # The encoder computes with the adapted weights too.
    assert not torch.allclose(encoder_causal_lm_logits(model, batch["input_ids"]).detach(), before)


def test_merge_returns_a_plain_diffusiongemma_with_the_adapted_outputs(tmp_path):
    model, peft_model, tok = lora_model()
    for name, param in model.named_parameters():
        if ".lora_B." in name:
            param.data.normal_(std=0.05)  # a trained-looking adapter
    ids = torch.tensor([[2, 6, 7, 8, 9, 5, 10, 11]])
    canvas = torch.tensor([[9, 3, 12, 0, 1, 15, 6, 7]])
    with torch.no_grad():
        adapted_encoder = encoder_causal_lm_logits(model, ids)
        adapted_decoder = model(input_ids=ids, decoder_input_ids=canvas).logits
    merged = merge_lora(peft_model, TARGETS)
    assert type(merged) is DiffusionGemmaForBlockDiffusion
    assert not [k for k in merged.state_dict() if "lora_" in k or "base_layer" in k]
    merged.save_pretrained(tmp_path)
    reloaded = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(encoder_causal_lm_logits(reloaded, ids), adapted_encoder, atol=1e-5)
        assert torch.allclose(reloaded(input_ids=ids, decoder_input_ids=canvas).logits, adapted_decoder, atol=1e-5)


def test_router_or_expert_targets_are_refused_naming_the_key():
    tok = build_board_tokenizer()
    model = DiffusionGemmaForBlockDiffusion(build_config("tiny", len(tok), CANVAS))
    for bad in (["q_proj", "router"], ["gate_up_proj"], []):
        with pytest.raises(InputError, match="trainer.lora.target_modules"):
            apply_lora(model, OmegaConf.merge(LORA, {"target_modules": bad}))
