"""Loading and saving model dirs: what a saved dir holds, how it round-trips, and the one clear error for a dir
that is neither a DiffusionGemma nor a Gemma 4 checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoTokenizer,
    DiffusionGemmaForBlockDiffusion,
    DiffusionGemmaGenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from dg_pipeline.core.errors import InputError
from dg_pipeline.data.tokenizer import build_board_tokenizer
from dg_pipeline.model import (
    build_model,
    encoder_causal_lm_logits,
    load_base,
    load_model,
    save_model,
    untied_backbone_weights,
)
from dg_pipeline.model.convert import parity_probe
from dg_pipeline.model.tiny_gemma4 import save_tiny_gemma4
from dg_pipeline.settings.sampler import generation_config


@pytest.fixture(scope="module")
def tokenizer():
    return build_board_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    return build_model("tiny", tokenizer, canvas_length=16, seed=0)


@pytest.fixture(scope="module")
def saved_dir(tiny_model, tokenizer, tmp_path_factory):
    return save_model(tiny_model, tokenizer, tmp_path_factory.mktemp("saved") / "model")


# --- generation config -----------------------------------------------------------------------------------------------


def test_a_new_generation_config_has_the_reference_sampler_settings_and_the_tokenizer_ids(tokenizer):
    config = generation_config(tokenizer)
    assert isinstance(config, DiffusionGemmaGenerationConfig)
    assert config.max_denoising_steps == 48
    assert config.sampler_config.entropy_bound == 0.1
    assert (config.t_min, config.t_max) == (0.4, 0.8)
    assert config.stability_threshold == 1
    assert config.confidence_threshold == 0.005
    assert (config.eos_token_id, config.pad_token_id, config.bos_token_id) == (1, 0, 2)


def test_generation_config_overrides_win_and_null_means_keep_the_default(tokenizer):
    config = generation_config(tokenizer, max_denoising_steps=12, entropy_bound=1, t_min=None)
    assert config.max_denoising_steps == 12
    assert config.sampler_config.entropy_bound == 1.0  # a YAML int is accepted
    assert config.t_min == 0.4


def test_an_invalid_generation_setting_is_one_input_error(tokenizer):
    with pytest.raises(InputError, match="t_max"):
        generation_config(tokenizer, t_min=0.9, t_max=0.5)


# --- saved dir -------------------------------------------------------------------------------------------------------


def test_a_saved_dir_holds_safetensors_config_tokenizer_and_the_sampler_keys_vllm_reads(saved_dir):
    assert (saved_dir / "model.safetensors").exists()
    config = json.loads((saved_dir / "config.json").read_text())
    assert config["architectures"] == ["DiffusionGemmaForBlockDiffusion"]
    assert config["model_type"] == "diffusion_gemma" and config["canvas_length"] == 16
    generation = json.loads((saved_dir / "generation_config.json").read_text())
    assert generation["max_denoising_steps"] == 48
    assert generation["sampler_config"]["entropy_bound"] == 0.1
    assert (generation["t_min"], generation["t_max"]) == (0.4, 0.8)
    assert (generation["stability_threshold"], generation["confidence_threshold"]) == (1, 0.005)
    assert (generation["eos_token_id"], generation["pad_token_id"], generation["bos_token_id"]) == (1, 0, 2)
    assert AutoTokenizer.from_pretrained(saved_dir).get_vocab() == build_board_tokenizer().get_vocab()


def test_generation_config_json_round_trips_through_both_from_pretrained(saved_dir, tokenizer):
    expected = generation_config(tokenizer).to_json_string(use_diff=False, ignore_metadata=True)
    standalone = DiffusionGemmaGenerationConfig.from_pretrained(saved_dir)
    assert standalone.to_json_string(use_diff=False, ignore_metadata=True) == expected
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(saved_dir)
    assert isinstance(model.generation_config, DiffusionGemmaGenerationConfig)
    assert model.generation_config.to_json_string(use_diff=False, ignore_metadata=True) == expected


@torch.no_grad()
def test_load_model_returns_the_same_weights_with_encoder_and_decoder_still_tied(saved_dir, tiny_model):
    model, tokenizer = load_model(saved_dir)
    assert isinstance(model, DiffusionGemmaForBlockDiffusion) and not model.training
    assert len(tokenizer) == 16
    assert untied_backbone_weights(model) == []
    probe = parity_probe(model.config, length=20)
    assert torch.equal(encoder_causal_lm_logits(model, probe), encoder_causal_lm_logits(tiny_model, probe))


def test_load_model_casts_to_the_requested_dtype(saved_dir):
    model, _ = load_model(saved_dir, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert untied_backbone_weights(model) == []


def test_a_diffusion_gemma_dir_is_loaded_as_is_and_canvas_length_can_be_overridden(saved_dir):
    loaded = load_base(saved_dir, canvas_length=64)
    assert loaded.kind == "diffusion_gemma" and loaded.conversion is None
    assert loaded.model.config.canvas_length == 64


def test_a_checkpoint_saved_with_plain_save_pretrained_gets_the_sampler_defaults(tiny_model, tokenizer, tmp_path):
    tiny_model.save_pretrained(tmp_path / "plain")  # its generation_config.json has nulls
    tokenizer.save_pretrained(tmp_path / "plain")
    model, _ = load_model(tmp_path / "plain")
    assert model.generation_config.max_denoising_steps == 48
    assert model.generation_config.eos_token_id == 1


def test_saving_over_an_existing_dir_is_atomic_when_the_save_fails(tiny_model, tokenizer, tmp_path):
    target = save_model(tiny_model, tokenizer, tmp_path / "model")
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    with torch.device("meta"):  # weights that were never materialised cannot be written
        unmaterialised = build_model("tiny", tokenizer, canvas_length=16)
    with pytest.raises(NotImplementedError, match="meta tensor"):
        save_model(unmaterialised, tokenizer, target)
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no half-written temporary dir left behind


def test_random_init_is_the_same_for_the_same_seed_and_differs_for_another(tokenizer):
    a = build_model("tiny", tokenizer, canvas_length=8, seed=7)
    b = build_model("tiny", tokenizer, canvas_length=8, seed=7)
    c = build_model("tiny", tokenizer, canvas_length=8, seed=8)
    weight = "model.decoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.state_dict()[weight], b.state_dict()[weight])
    assert not torch.equal(a.state_dict()[weight], c.state_dict()[weight])


def test_random_init_can_pad_the_vocabulary_but_never_shrink_it(tokenizer):
    assert build_model("tiny", tokenizer, canvas_length=8, vocab_size=64).config.text_config.vocab_size == 64
    with pytest.raises(InputError, match="model.vocab_size=8"):
        build_model("tiny", tokenizer, canvas_length=8, vocab_size=8)


# --- the one clear error for a dir that is neither ---------------------------------------------------------------


def _llama_dir(path, tokenizer):
    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _dir_without(name: str):
    def make(path, tokenizer):
        save_tiny_gemma4(path)
        (path / name).unlink()
        return path

    return make


def _bad_json(path, tokenizer):
    save_tiny_gemma4(path)
    (path / "config.json").write_text('{\n  "model_type": "gemma4_text",\n  oops\n}')
    return path


NOT_A_CHECKPOINT = {
    "missing dir": (lambda path, tok: path / "nope", ["directory not found", "DiffusionGemma", "Gemma 4"]),
    "a file": (lambda path, tok: (path / "weights.bin").write_text("x") and path / "weights.bin", ["not a directory"]),
    "no config.json": (_dir_without("config.json"), ["config.json is missing", "DiffusionGemma", "Gemma 4"]),
    "another model type": (_llama_dir, ["config.json has model_type='llama'", "diffusion_gemma, gemma4_text, gemma4"]),
    "no weights": (_dir_without("model.safetensors"), ["no weights", "model.safetensors"]),
    "no tokenizer": (_dir_without("tokenizer.json"), ["no tokenizer", "tokenizer.json", "save_pretrained"]),
    "invalid config.json": (_bad_json, ["config.json:3", "invalid JSON"]),
}


@pytest.mark.parametrize("case", list(NOT_A_CHECKPOINT))
def test_a_dir_that_is_neither_gets_one_error_naming_the_dir_and_what_was_expected(tmp_path, tokenizer, case):
    make, fragments = NOT_A_CHECKPOINT[case]
    path = make(tmp_path / "ckpt" if case != "a file" else tmp_path, tokenizer)
    with pytest.raises(InputError) as error:
        load_base(path)
    message = str(error.value)
    assert "model.base=" in message and str(path.name) in message
    for fragment in fragments:
        assert fragment in message, message


def test_a_tokenizer_bigger_than_the_embedding_table_is_refused(tmp_path):
    checkpoint = save_tiny_gemma4(tmp_path / "g4", vocab_size=8)  # the board tokenizer has 16 tokens
    with pytest.raises(InputError, match="tokenizer has 16 tokens but the model's vocab_size is 8"):
        load_base(checkpoint)


def test_an_unknown_dtype_names_the_key(saved_dir):
    with pytest.raises(InputError, match="model.dtype=fp8"):
        load_base(saved_dir, dtype="fp8")


def test_a_checkpoint_missing_a_tensor_is_refused_with_the_tensor_named(saved_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(saved_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    dropped = next(name for name in sorted(tensors) if "self_attn.q_proj.weight" in name)
    del tensors[dropped]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"the weights lack \d+ DiffusionGemma tensors .*incomplete") as refused:
        load_model(broken)
    assert str(broken) in str(refused.value) and dropped.split(".", 1)[-1] in str(refused.value)
