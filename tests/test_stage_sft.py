"""End-to-end specification of the training stages: `pretrain` (encoder AR loss only) and `sft` (block diffusion),
as `python -m dg_pipeline stage=...` runs them, on the tiny model and a few generated 4x4 boards."""

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion

from dg_pipeline.core import InputError, read_json
from dg_pipeline.model.structure import untied_backbone_weights
from dg_pipeline.stages import run_stage

SMALL = [
    "model=tiny",
    "logger=none",
    "data.n_train=48",
    "data.n_val=8",
    "data.n_eval=4",
    "trainer.batch_size=8",
    "trainer.max_steps=3",
    "trainer.pretrain_steps=2",
    "trainer.warmup_steps=1",
    "trainer.val_check_interval=2",
    "trainer.progress_bar=none",
    "verify.batch_size=4",
    "verify.speed_examples=1",
    "verify.plots=false",
    "sampler.max_denoising_steps=4",
    "device=cpu",
]


@pytest.fixture
def run_dir(tmp_path, compose_cfg):
    """A run dir that already holds stage=base's output."""
    run_stage(compose_cfg("stage=base", f"run_dir={tmp_path}", *SMALL))
    return tmp_path


def test_sft_without_a_base_model_names_the_stage_to_run(tmp_path, compose_cfg):
    with pytest.raises(InputError, match=r"run `stage=base run_dir="):
        run_stage(compose_cfg("stage=sft", f"run_dir={tmp_path}", *SMALL))


def test_pretrain_with_zero_steps_names_the_key(tmp_path, compose_cfg):
    with pytest.raises(InputError, match="trainer.pretrain_steps=0"):
        run_stage(compose_cfg("stage=pretrain", f"run_dir={tmp_path}", *SMALL, "trainer.pretrain_steps=0"))


def test_pretrain_then_lora_sft_write_plain_models_figures_and_gates_and_skip_when_done(run_dir, compose_cfg):
    run_stage(compose_cfg("stage=pretrain", f"run_dir={run_dir}", *SMALL))
    pretrain = read_json(run_dir / "pretrain" / "training.json")
    assert pretrain["objective"] == "ar" and pretrain["steps"] == 2
    assert pretrain["input"] == str(run_dir / "base" / "model")

    cfg = compose_cfg("stage=sft", f"run_dir={run_dir}", *SMALL, "trainer.lora.enabled=true", "trainer.lora.rank=4")
    record = run_stage(cfg)

    figures = read_json(run_dir / "sft" / "training.json")
    assert figures["input"] == str(run_dir / "pretrain" / "model")  # sft starts from pretrain when it exists
    assert figures["objective"] == "uniform" and figures["lora"] is True and figures["steps"] == 3
    for key in ("final_train_loss", "val_loss", "val_acc_t1", "val_acc_t05", "tokens_per_second", "wall_seconds"):
        assert figures[key] is not None, key
    verify = read_json(run_dir / "sft" / "verify.json")
    assert verify["stage"] == "sft" and verify["training"]["val_loss"] == figures["val_loss"]
    assert record["stage"] == "sft"

    # The saved model is a plain DiffusionGemma dir: LoRA merged, encoder/decoder still tied.
    model_dir = run_dir / "sft" / "model"
    assert (model_dir / "generation_config.json").is_file() and (model_dir / "tokenizer.json").is_file()
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(model_dir)
    assert not [k for k in model.state_dict() if "lora" in k]
    assert untied_backbone_weights(model) == []
    base = DiffusionGemmaForBlockDiffusion.from_pretrained(run_dir / "pretrain" / "model")
    assert not torch.equal(model.model.decoder.layers[0].self_attn.q_proj.weight,
                           base.model.decoder.layers[0].self_attn.q_proj.weight)

    again = run_stage(cfg)
    assert again.get("skipped") is True


def test_sft_writes_the_step_budget_chosen_from_the_val_curve_into_generation_config(run_dir, compose_cfg):
    # sampler.max_denoising_steps unset (null): the choice runs; a loss allowance of 1.0 accepts the first budget.
    small = [o for o in SMALL if not o.startswith("sampler.max_denoising_steps")]
    cfg = compose_cfg("stage=sft", f"run_dir={run_dir}", *small, "verify.sweep_steps=[2,3]",
                      "verify.choose_steps_max_loss=1.0")
    record = run_stage(cfg)
    choice = record["step_choice"]
    assert choice["max_denoising_steps"] == 2 and choice["split"] == "val" and choice["n"] == 8
    assert choice["reference"]["max_denoising_steps"] == 48  # the base model's (the DiffusionGemma default)
    assert read_json(run_dir / "sft" / "model" / "generation_config.json")["max_denoising_steps"] == 2
    assert record["sampler"]["max_denoising_steps"] == 2  # the gate ran the written settings

    # An explicit sampler.max_denoising_steps is the user's choice: nothing is chosen.
    again = run_stage(compose_cfg("stage=sft", f"run_dir={run_dir}", *SMALL, "force=true"))
    assert again["step_choice"] is None
