"""Stage `base` end to end, driven by a Hydra config composed from conf/ exactly as the entry point composes it
(the `compose_cfg` fixture of conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion, DiffusionGemmaGenerationConfig

from dg_pipeline.core.errors import InputError
from dg_pipeline.model import untied_backbone_weights
from dg_pipeline.model.convert import ConversionReport
from dg_pipeline.model.tiny_gemma4 import save_tiny_gemma4
from dg_pipeline.stages import base


@pytest.fixture
def base_cfg(compose_cfg):
    """base_cfg(run_dir, *overrides) -> the config of `python -m dg_pipeline stage=base run_dir=... <overrides>`."""
    return lambda run_dir, *overrides: compose_cfg("stage=base", f"run_dir={run_dir}", "device=cpu", *overrides)


def read_verify(run_dir) -> dict:
    return json.loads((Path(run_dir) / "base" / "verify.json").read_text())


def test_model_init_tiny_writes_a_loadable_model_dir_and_a_passing_verify_json(base_cfg, tmp_path):
    result = base.run(base_cfg(tmp_path, "model.init=tiny"))
    model_dir = tmp_path / "base" / "model"
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(model_dir)
    assert untied_backbone_weights(model) == []
    assert model.config.canvas_length == 17  # the sudoku4 recipe's canvas (answer + EOS)
    generation = DiffusionGemmaGenerationConfig.from_pretrained(model_dir)
    assert generation.max_denoising_steps == 48 and generation.eos_token_id == 1
    verify = read_verify(tmp_path)
    assert verify == result
    assert verify["stage"] == "base" and verify["input"] == "init:tiny" and verify["source_kind"] == "init"
    assert verify["passed"] is True
    assert verify["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert verify["conversion_parity_max_abs_logit_diff"] is None
    names = {c["name"] for c in verify["checks"]}
    assert {"untied_backbone_weights_after_reload", "reload_layer_relative_error", "reload_pinned_max_abs_logit_diff",
            "reload_routing_disagreement", "generation_config_round_trip", "tokenizer_round_trip"} <= names
    assert verify["reload_parity"]["layers"] == 2 and verify["eos_token_id"] == 1
    assert all(set(c) == {"name", "value", "threshold", "op", "passed"} for c in verify["checks"])


def test_a_second_run_is_skipped_and_says_so_and_force_rebuilds(base_cfg, tmp_path, capsys):
    cfg = base_cfg(tmp_path, "model.init=tiny")
    base.run(cfg)
    weights = tmp_path / "base" / "model" / "model.safetensors"
    first_write = weights.stat().st_mtime_ns
    capsys.readouterr()
    assert base.run(cfg)["skipped"] is True
    assert "skipped" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == first_write
    assert "skipped" not in base.run(base_cfg(tmp_path, "model.init=tiny", "force=true"))


def test_a_base_built_from_other_settings_is_rebuilt_and_says_which_settings_changed(base_cfg, tmp_path, capsys):
    base.run(base_cfg(tmp_path, "model.init=tiny"))
    capsys.readouterr()
    record = base.run(base_cfg(tmp_path, "model.init=tiny", "seed=7"))
    assert "skipped" not in record and record["source"]["seed"] == 7
    out = " ".join(capsys.readouterr().out.split())
    assert "base: rebuilding:" in out and "was made with other seed settings" in out


def test_random_init_is_seeded_by_the_run_seed(base_cfg, tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        base.run(base_cfg(tmp_path / name, "model.init=tiny", f"seed={seed}"))
    weights = {
        name: DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / name / "base" / "model").lm_head.weight
        for name in "abc"
    }
    assert torch.equal(weights["a"], weights["b"]) and not torch.equal(weights["a"], weights["c"])


@pytest.mark.parametrize("vision", [False, True], ids=["text-only", "with-vision"])
def test_a_gemma4_base_is_converted_and_its_parity_recorded(base_cfg, tmp_path, vision):
    checkpoint = save_tiny_gemma4(tmp_path / "gemma4", vision=vision)
    result = base.run(base_cfg(tmp_path / "run", f"model.base={checkpoint}"))
    assert result["source_kind"] == "gemma4_converted" and result["passed"] is True
    assert result["input"] == str(checkpoint)
    assert result["conversion_parity_max_abs_logit_diff"] < 1e-4
    checks = {c["name"]: c for c in result["checks"]}
    parity = checks["conversion_parity_pinned_max_abs_logit_diff"]
    assert parity["threshold"] == 1e-4 and parity["passed"] is True
    assert checks["conversion_parity_layer_relative_error"]["passed"] is True
    assert checks["conversion_parity_routing_disagreement"]["value"] == 0.0
    assert ("vision_parity_max_abs_diff" in checks) is vision
    assert checks["self_conditioning_noop_max_abs_logit_diff"]["value"] == 0.0
    # Gemma 4 parameters + the new self-conditioning block (+ the vision placeholder for a text-only source).
    params = result["params"]
    added = params["self_conditioning"] + (0 if vision else params["vision"])
    assert params["total"] == result["source_params"] + added
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "run" / "base" / "model")
    assert untied_backbone_weights(model) == [] and model.config.canvas_length == 17


def test_a_diffusion_gemma_base_is_loaded_as_is(base_cfg, tmp_path):
    base.run(base_cfg(tmp_path / "first", "model.init=tiny"))
    first_dir = tmp_path / "first" / "base" / "model"
    result = base.run(base_cfg(tmp_path / "second", f"model.base={first_dir}"))
    assert result["source_kind"] == "diffusion_gemma" and result["passed"] is True
    first = DiffusionGemmaForBlockDiffusion.from_pretrained(first_dir).state_dict()
    second = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "second" / "base" / "model").state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_model_base_that_does_not_exist_names_model_base(base_cfg, tmp_path):
    with pytest.raises(InputError, match=r"model.base=.*nowhere: directory not found"):
        base.run(base_cfg(tmp_path, f"model.base={tmp_path / 'nowhere'}"))
    assert not (tmp_path / "base" / "verify.json").exists()


def test_the_chat_recipe_without_model_base_says_it_is_required(base_cfg, tmp_path):
    with pytest.raises(InputError, match="model.base is required"):
        base.run(base_cfg(tmp_path, "recipe=chat"))


def test_a_random_init_without_the_board_tokenizer_is_refused(base_cfg, tmp_path):
    with pytest.raises(InputError, match="model.init=tiny.*data.kind=chat"):
        base.run(base_cfg(tmp_path, "model.init=tiny", "data=chat"))


def test_a_parity_above_the_threshold_fails_its_check():
    parity = {"layer_relative_error": 3e-3, "worst_layer": 1, "pinned_max_abs_logit_diff": 1e-6,
              "routing_disagreement": 0.5}
    report = ConversionReport("Gemma4ForCausalLM", 10, has_vision=False, parity_max_abs_logit_diff=3e-3,
                              parity=parity, self_conditioning_max_abs_diff=0.0)
    checks = {c["name"]: c for c in base.conversion_checks(report, torch.float32)}
    assert checks["conversion_parity_layer_relative_error"]["passed"] is False
    assert checks["conversion_parity_routing_disagreement"]["passed"] is False
    assert checks["conversion_parity_pinned_max_abs_logit_diff"]["passed"] is True
    assert checks["self_conditioning_noop_max_abs_logit_diff"]["passed"] is True
