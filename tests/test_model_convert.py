"""Gemma 4 -> DiffusionGemma conversion: parity, ties, vision carry-over, self-conditioning, refusals.

Every checkpoint here is a real tiny Gemma 4 written with save_pretrained and read back through load_base, the same
code path the base stage uses.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import (
    DiffusionGemmaConfig,
    DiffusionGemmaTextConfig,
    Gemma4AudioConfig,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
)

from dg_pipeline.core.errors import InputError
from dg_pipeline.model import (
    conversion_parity,
    encoder_causal_lm_logits,
    load_base,
    load_model,
    save_model,
    untied_backbone_weights,
)
from dg_pipeline.model.convert import (
    HARMLESS_TEXT_KEYS,
    HARMLESS_TOP_KEYS,
    PARITY_THRESHOLDS,
    TEXT_RULES,
    TOP_RULES,
    parity_probe,
    self_conditioning_effect,
)
from dg_pipeline.model.parity import LAYER_TOLERANCE
from dg_pipeline.model.tiny_gemma4 import TINY_IMAGE_IDS, build_tiny_gemma4, save_tiny_gemma4, tiny_gemma4_config

PARITY = 1e-4  # fp32 max |Δ logit|


@pytest.fixture(scope="module")
def gemma4_text_dir(tmp_path_factory):
    return save_tiny_gemma4(tmp_path_factory.mktemp("gemma4_text"), vision=False)


@pytest.fixture(scope="module")
def gemma4_vision_dir(tmp_path_factory):
    return save_tiny_gemma4(tmp_path_factory.mktemp("gemma4_vision"), vision=True)


@pytest.fixture(scope="module")
def converted_text(gemma4_text_dir):
    return load_base(gemma4_text_dir, canvas_length=8, check_parity=True)


@pytest.fixture(scope="module")
def converted_vision(gemma4_vision_dir):
    return load_base(gemma4_vision_dir, canvas_length=8, check_parity=True)


# --- parity ----------------------------------------------------------------------------------------------------------


def test_text_only_gemma4_converts_and_its_encoder_reproduces_the_gemma4_logits(converted_text):
    report = converted_text.conversion
    assert converted_text.kind == "gemma4_converted"
    assert report.source_architecture == "Gemma4ForCausalLM"
    assert report.parity_max_abs_logit_diff < PARITY
    assert report.probe["tokens"] == 64  # longer than the sliding window (8): both attention kinds are exercised
    assert converted_text.model.config.canvas_length == 8


def test_text_only_gemma4_gets_a_placeholder_vision_tower_whose_image_id_no_token_can_hit(converted_text):
    config = converted_text.model.config
    assert config.vision_config is not None  # the DiffusionGemma class cannot be built without one
    assert config.image_token_id >= config.text_config.vocab_size


def test_vision_gemma4_carries_its_vision_tower_and_embedder_over(gemma4_vision_dir, converted_vision):
    report = converted_vision.conversion
    assert report.source_architecture == "Gemma4ForConditionalGeneration"
    assert report.parity_max_abs_logit_diff < PARITY
    assert report.vision_max_abs_diff < PARITY
    source = Gemma4ForConditionalGeneration.from_pretrained(gemma4_vision_dir)
    encoder = converted_vision.model.model.encoder
    for name, tensor in source.model.vision_tower.state_dict().items():
        assert torch.equal(encoder.vision_tower.state_dict()[name], tensor), name
    embedder = source.model.embed_vision.embedding_projection.weight
    assert torch.equal(encoder.embed_vision.embedding_projection.weight, embedder)
    assert converted_vision.model.config.image_token_id == TINY_IMAGE_IDS["image_token_id"]


@torch.no_grad()
def test_a_prompt_with_an_image_gets_the_same_logits_from_the_converted_encoder(gemma4_vision_dir, converted_vision):
    source = Gemma4ForConditionalGeneration.from_pretrained(gemma4_vision_dir).eval()
    vision = source.config.vision_config
    side = 2 * vision.pooling_kernel_size  # 4 soft tokens
    pixels = torch.rand(1, side * side, 3 * vision.patch_size**2, generator=torch.Generator().manual_seed(1))
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    positions = torch.stack([xs.flatten(), ys.flatten()], -1)[None]
    image = TINY_IMAGE_IDS["image_token_id"]
    ids = torch.tensor([[2, 4, image, image, image, image, 5, 7, 8, 9, 10, 11, 12, 13]])
    expected = source(input_ids=ids, pixel_values=pixels, image_position_ids=positions).logits
    got = encoder_causal_lm_logits(converted_vision.model, ids, pixel_values=pixels, image_position_ids=positions)
    assert (expected - got).abs().max().item() < PARITY


def test_a_bfloat16_conversion_stays_within_one_bf16_ulp_of_the_cap(gemma4_vision_dir):
    report = load_base(gemma4_vision_dir, canvas_length=8, dtype="bfloat16", check_parity=True).conversion
    assert report.parity_max_abs_logit_diff <= PARITY_THRESHOLDS[torch.bfloat16]
    assert report.vision_max_abs_diff <= PARITY_THRESHOLDS[torch.bfloat16]


@torch.no_grad()
def test_parity_detects_a_single_wrong_weight(gemma4_text_dir, converted_text):
    source = build_tiny_gemma4(tiny_gemma4_config())  # the same seed as the saved checkpoint
    probe = parity_probe(source.config)
    model = converted_text.model
    assert conversion_parity(model, source, probe).layer_relative_error < LAYER_TOLERANCE[torch.float32]
    weight = model.model.encoder.language_model.layers[1].mlp.down_proj.weight
    saved = weight.clone()
    # Noise, not a rescale: every Gemma 4 sub-block ends in an RMSNorm, which would undo a pure rescale.
    weight.add_(0.1 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    try:
        parity = conversion_parity(model, source, probe)
        assert parity.layer_relative_error > 1e-2 and parity.worst_layer == 1
    finally:
        weight.copy_(saved)


# --- shared backbone, self-conditioning ------------------------------------------------------------------------------


def test_encoder_and_decoder_share_every_text_weight_and_still_do_after_save_and_load(converted_text, tmp_path):
    model = converted_text.model
    assert untied_backbone_weights(model) == []
    save_model(model, converted_text.tokenizer, tmp_path / "dg")
    reloaded, _ = load_model(tmp_path / "dg")
    assert untied_backbone_weights(reloaded) == []
    # The tie is a shared tensor, not a copy: writing through the encoder changes the decoder.
    with torch.no_grad():
        reloaded.model.encoder.language_model.layers[0].self_attn.q_proj.weight.add_(1.0)
    assert torch.equal(
        reloaded.model.decoder.layers[0].self_attn.q_proj.weight,
        reloaded.model.encoder.language_model.layers[0].self_attn.q_proj.weight,
    )
    # layer_scalar is a buffer (copied, not tied): the Gemma 4 value reaches the decoder and survives the reload.
    assert [float(layer.layer_scalar) for layer in reloaded.model.decoder.layers] == pytest.approx([0.7, 0.7])


def test_self_conditioning_starts_as_a_no_op_for_the_previous_step_logits(converted_text):
    model = converted_text.model
    assert converted_text.conversion.self_conditioning_max_abs_diff == 0.0
    assert torch.count_nonzero(model.model.decoder.self_conditioning.down_proj.weight) == 0
    probe = parity_probe(model.config, length=12, seed=3)
    assert self_conditioning_effect(model, probe, seed=3) == 0.0


def test_an_unknown_but_harmless_config_key_does_not_block_conversion(tmp_path):
    checkpoint = save_tiny_gemma4(tmp_path / "g4")
    config = json.loads((checkpoint / "config.json").read_text())
    config["my_finetuning_note"] = "harmless"
    (checkpoint / "config.json").write_text(json.dumps(config))
    loaded = load_base(checkpoint, canvas_length=8, check_parity=True)
    assert loaded.conversion.parity_max_abs_logit_diff < PARITY


def test_load_model_converts_a_gemma4_dir_through_the_same_path(gemma4_text_dir):
    model, tokenizer = load_model(gemma4_text_dir, canvas_length=16)
    assert type(model).__name__ == "DiffusionGemmaForBlockDiffusion"
    assert model.config.canvas_length == 16 and len(tokenizer) == 16


# --- refusals --------------------------------------------------------------------------------------------------------

TINY_AUDIO = Gemma4AudioConfig(
    hidden_size=16, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[4, 4], output_proj_dims=16
).to_dict()

# feature named in the error -> (text-config overrides, audio config, config keys the error must name)
UNSUPPORTED = {
    "per-layer input embeddings": (dict(hidden_size_per_layer_input=8), None, ["hidden_size_per_layer_input=8"]),
    "KV-shared layers": (dict(num_kv_shared_layers=1), None, ["num_kv_shared_layers=1"]),
    "double-wide MLP": (
        dict(num_kv_shared_layers=1, use_double_wide_mlp=True), None, ["use_double_wide_mlp=True"],
    ),
    "no MoE block": (dict(enable_moe_block=False), None, ["enable_moe_block=False"]),
    "separate value projection in full-attention layers": (
        dict(attention_k_eq_v=False), None, ["attention_k_eq_v=False"],
    ),
    "no final-logit soft-capping": (dict(final_logit_softcapping=None), None, ["final_logit_softcapping=None"]),
    "untied lm_head": (dict(tie_word_embeddings=False), None, ["tie_word_embeddings=False"]),
    "bidirectional text attention": (
        dict(use_bidirectional_attention="all"), None, ["use_bidirectional_attention='all'"],
    ),
    "audio tower": ({}, TINY_AUDIO, ["audio_config"]),
}


@pytest.mark.parametrize("feature", list(UNSUPPORTED))
def test_a_gemma4_variant_the_backbone_cannot_run_is_refused_naming_the_feature(tmp_path, feature):
    text_overrides, audio, keys = UNSUPPORTED[feature]
    checkpoint = save_tiny_gemma4(tmp_path / "g4", audio=audio, **text_overrides)
    with pytest.raises(InputError) as error:
        load_base(checkpoint, canvas_length=8)
    message = str(error.value)
    assert feature in message
    assert all(key in message for key in keys), message
    assert f"model.base={checkpoint}" in message


def test_every_unsupported_feature_is_listed_in_one_error(tmp_path):
    checkpoint = save_tiny_gemma4(
        tmp_path / "g4", enable_moe_block=False, attention_k_eq_v=False, hidden_size_per_layer_input=8
    )
    with pytest.raises(InputError) as error:
        load_base(checkpoint)
    for feature in ("per-layer input embeddings", "no MoE block", "separate value projection"):
        assert feature in str(error.value)


def test_double_wide_mlp_without_kv_sharing_changes_nothing_and_converts(tmp_path):
    checkpoint = save_tiny_gemma4(tmp_path / "g4", use_double_wide_mlp=True)
    assert load_base(checkpoint, canvas_length=8, check_parity=True).conversion.parity_max_abs_logit_diff < PARITY


def _own_fields(config_class) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class)}


def test_every_gemma4_only_config_key_is_either_refused_or_known_harmless():
    # Keeps the refusal list complete against the installed transformers: a new Gemma 4 flag fails here first.
    text_only = _own_fields(Gemma4TextConfig) - _own_fields(DiffusionGemmaTextConfig)
    assert text_only <= {r.key for r in TEXT_RULES} | set(HARMLESS_TEXT_KEYS), text_only
    top_only = _own_fields(Gemma4Config) - _own_fields(DiffusionGemmaConfig)
    assert top_only <= {r.key for r in TOP_RULES} | set(HARMLESS_TOP_KEYS), top_only


# --- stop tokens ---------------------------------------------------------------------------------------------------


def _eos_in_files(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    generation = json.loads((model_dir / "generation_config.json").read_text())
    return config["text_config"]["eos_token_id"], generation["eos_token_id"]


@pytest.mark.parametrize("stated_in", ["both files", "generation_config.json only"])
def test_a_gemma4_chat_checkpoint_keeps_its_stop_list_through_conversion_save_and_reload(tmp_path, stated_in):
    source = save_tiny_gemma4(tmp_path / "gemma4", chat=True)  # eos [1, 106]: <eos>, <turn|>
    if stated_in != "both files":  # config.json says only <eos>, as the tokenizer does
        config = json.loads((source / "config.json").read_text())
        config["eos_token_id"] = 1
        (source / "config.json").write_text(json.dumps(config))
    assert json.loads((source / "generation_config.json").read_text())["eos_token_id"] == [1, 106]
    loaded = load_base(source, canvas_length=8)
    assert loaded.tokenizer.eos_token_id == 1  # the tokenizer alone would say 1
    assert loaded.model.generation_config.eos_token_id == [1, 106]
    assert loaded.model.config.text_config.eos_token_id == [1, 106]
    save_model(loaded.model, loaded.tokenizer, tmp_path / "converted")
    assert _eos_in_files(tmp_path / "converted") == ([1, 106], [1, 106])
    model, tokenizer = load_model(tmp_path / "converted")
    save_model(model, tokenizer, tmp_path / "again")
    assert _eos_in_files(tmp_path / "again") == ([1, 106], [1, 106])
    from dg_pipeline.sampling import SamplerConfig

    assert SamplerConfig.for_model(model).eos_token_ids == (1, 106)  # the sampler stops at either
