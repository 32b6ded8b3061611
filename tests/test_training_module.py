"""Specification of the Lightning wiring (dg_pipeline.training): the optimisation recipe, the frozen router, and a
real `fit` through NeMo's exp_manager with an offline W&B run, checkpoints and resume."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import DiffusionGemmaForBlockDiffusion

from helpers import board_examples

from dg_pipeline.core.errors import InputError
from dg_pipeline.data.collate import collate
from dg_pipeline.data.tokenizer import build_board_tokenizer
from dg_pipeline.model import build_config
from dg_pipeline.objective import NoiseKey, UniformObjective, build_objective
from dg_pipeline.training.module import (
    BlockDiffusionModule,
    OptimConfig,
    freeze_router,
    freeze_vision,
    parameter_groups,
)
from dg_pipeline.settings import LoggerSettings, ObjectiveSettings, TrainerSettings, group_settings
from dg_pipeline.training.trainer import (
    TrainingJob,
    exp_manager_config,
    final_state_dict,
    fit,
    make_loaders,
    prepare_exp_dir,
)

CONF = Path(__file__).resolve().parents[1] / "conf"
CANVAS = 8


def tiny_model(seed=0):
    tok = build_board_tokenizer()
    torch.manual_seed(seed)
    return DiffusionGemmaForBlockDiffusion(build_config("tiny", len(tok), CANVAS)), tok


def trainable_tiny_model(seed=0):
    model, tok = tiny_model(seed)
    freeze_router(model)
    freeze_vision(model)
    return model, tok


def stage_cfg(run_dir, **trainer_overrides):
    cfg = OmegaConf.create({
        "trainer": OmegaConf.load(CONF / "trainer" / "cpu.yaml"),
        "logger": OmegaConf.load(CONF / "logger" / "wandb.yaml"),
        "objective": OmegaConf.load(CONF / "objective" / "uniform.yaml"),
        "run_dir": str(run_dir),
        "device": "cpu",
        "seed": 0,
        "force": False,
    })
    cfg.trainer = OmegaConf.merge(cfg.trainer, {"batch_size": 4, "log_every_n_steps": 1, "progress_bar": "none",
                                                **trainer_overrides})
    return cfg


def job(cfg, stage_dir, max_steps, **kwargs):
    """The TrainingJob stage=sft hands `fit` for `cfg` (the groups typed as the entry point types them)."""
    return TrainingJob(
        stage="sft", stage_dir=stage_dir, max_steps=max_steps,
        trainer=group_settings(TrainerSettings, cfg.trainer), objective=group_settings(ObjectiveSettings, cfg.objective),
        logger=group_settings(LoggerSettings, cfg.logger), run_dir=Path(cfg.run_dir).resolve(), seed=0, device="cpu",
        **kwargs,
    )


def test_router_is_frozen_and_unchanged_by_a_step_while_the_backbone_learns():
    model, tok = tiny_model()
    assert freeze_router(model) == 3 * model.config.text_config.num_hidden_layers  # proj, scale, per_expert_scale
    freeze_vision(model)
    router = {n: p.detach().clone() for n, p in model.named_parameters() if ".router." in n}
    q_proj = model.model.decoder.layers[0].self_attn.q_proj.weight.detach().clone()
    module = BlockDiffusionModule(model, UniformObjective(), OptimConfig(lr=1e-2, max_steps=10))
    optimizer = module.configure_optimizers()["optimizer"]
    batch = collate(board_examples(4), canvas_length=CANVAS, pad_id=tok.pad_token_id)
    module.objective.loss(model, batch, NoiseKey(0)).loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if ".router." in name:
            assert not param.requires_grad and torch.equal(param, router[name]), name
    assert not torch.equal(model.model.decoder.layers[0].self_attn.q_proj.weight, q_proj)
    # The tie survives the step: the encoder computes with the decoder's updated weight.
    assert model.model.encoder.language_model.layers[0].self_attn.q_proj.weight is \
        model.model.decoder.layers[0].self_attn.q_proj.weight


def test_no_ddp_or_lightning_sync_overwrites_a_ranks_rotary_buffers():
    # Rank 0's buffers broadcast by position would swap the per-layer-type rotary frequencies on a rank whose
    # string hashing ordered them differently (tests/test_stage_distributed.py: DDP and FSDP val loss agree).
    model, _ = tiny_model()
    module = BlockDiffusionModule(model, UniformObjective(), OptimConfig(lr=1e-3, max_steps=1))
    buffers = {name for name, _ in module.named_buffers()}
    assert any("rotary_emb" in name for name in buffers)
    assert set(module._ddp_params_and_buffers_to_ignore) == buffers


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_down_to_the_min_ratio():
    model, _ = tiny_model()
    module = BlockDiffusionModule(model, UniformObjective(), OptimConfig(lr=1.0, max_steps=10, warmup_steps=2,
                                                                         min_lr_ratio=0.1))
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(11):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[10] == pytest.approx(0.1)


def test_weight_decay_applies_to_matrices_only_and_betas_come_from_the_config():
    model, _ = tiny_model()
    freeze_router(model)
    decayed, plain = parameter_groups(model, 0.01)
    assert decayed["weight_decay"] == 0.01 and all(p.ndim >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.ndim < 2 for p in plain["params"])
    optim = OptimConfig.from_trainer_cfg(OmegaConf.load(CONF / "trainer" / "cpu.yaml"), max_steps=5)
    assert optim.betas == (0.95, 0.99)
    with pytest.raises(InputError, match="trainer.betas"):
        OptimConfig.from_trainer_cfg(OmegaConf.merge(OmegaConf.load(CONF / "trainer" / "cpu.yaml"),
                                                     {"betas": [0.9]}), max_steps=5)


def test_exp_manager_gets_wandb_offline_under_the_run_dir_and_checkpoints_under_the_stage(tmp_path):
    cfg = stage_cfg(tmp_path)
    em = exp_manager_config(job(cfg, tmp_path / "sft", max_steps=10))
    assert em["explicit_log_dir"] == str(tmp_path / "sft" / "exp")
    assert em["create_wandb_logger"] and em["wandb_logger_kwargs"]["offline"]
    assert em["wandb_logger_kwargs"]["save_dir"] == str(tmp_path.resolve())
    assert em["wandb_logger_kwargs"]["project"] == "dg_pipeline"
    # The checkpoint to resume is chosen by dg_pipeline.training.checkpoints, and handed to exp_manager.
    assert em["resume_if_exists"] is False and em["resume_from_checkpoint"] is None
    resumed = exp_manager_config(job(cfg, tmp_path / "sft", max_steps=10), resume_from=tmp_path / "sft-3-last.ckpt")
    assert resumed["resume_from_checkpoint"] == str(tmp_path / "sft-3-last.ckpt")
    assert em["checkpoint_callback_params"]["monitor"] == "val/loss"
    disabled = exp_manager_config(job(OmegaConf.merge(cfg, {"logger": {"mode": "disabled"}}), tmp_path, 10))
    assert not disabled["create_wandb_logger"]
    with pytest.raises(InputError, match="logger.mode=sometimes"):
        exp_manager_config(job(OmegaConf.merge(cfg, {"logger": {"mode": "sometimes"}}), tmp_path, 10))


def test_fit_logs_the_metrics_checkpoints_resumes_and_writes_an_offline_wandb_run(tmp_path):
    import wandb

    model, tok = trainable_tiny_model()
    examples = board_examples(24)
    cfg = stage_cfg(tmp_path, val_check_interval=2, warmup_steps=1, lr=3e-3)
    train, val = make_loaders(examples[:16], examples[16:], cfg.trainer, CANVAS, tok.pad_token_id, seed=0)
    objective = build_objective(cfg.objective, tok)
    module = BlockDiffusionModule(model, objective, OptimConfig.from_trainer_cfg(cfg.trainer, 3))
    try:
        result, trainer = fit(module, train, val, job(cfg, tmp_path / "sft", max_steps=3))
        logged = set(trainer.callback_metrics) | {"train/loss"}
        assert {"val/loss", "val/diffusion_loss", "val/ar_loss", "val/acc_t1.0", "val/acc_t0.5",
                "val/answer_acc_t1.0", "val/answer_acc_t0.5"} <= logged
        assert result.steps == 3 and result.resumed_from is None
        assert result.tokens_per_second > 0 and result.wall_seconds > 0
        assert 0.0 <= result.val_acc_t1 <= 1.0 and 0.0 <= result.val_acc_t05 <= 1.0
        assert result.val_loss == pytest.approx(result.val_diffusion_loss + result.val_ar_loss, rel=1e-5)
        checkpoints = sorted(p.name for p in (tmp_path / "sft" / "exp" / "checkpoints").glob("*.ckpt"))
        assert "sft-3-last.ckpt" in checkpoints
        assert list((tmp_path / "wandb").glob("offline-run-*"))

        # A second run with a longer schedule resumes from the last checkpoint instead of starting over.
        module2 = BlockDiffusionModule(trainable_tiny_model(seed=1)[0], objective, OptimConfig.from_trainer_cfg(cfg.trainer, 5))
        resumed, _ = fit(module2, train, val, job(cfg, tmp_path / "sft", max_steps=5))
        assert resumed.resumed_from and resumed.resumed_from.endswith("sft-3-last.ckpt")
        assert resumed.steps == 5
    finally:
        wandb.finish()


def test_fit_refuses_zero_steps_naming_the_key(tmp_path):
    model, tok = tiny_model()
    cfg = stage_cfg(tmp_path)
    train, val = make_loaders(board_examples(4), [], cfg.trainer, CANVAS, tok.pad_token_id, seed=0)
    module = BlockDiffusionModule(model, UniformObjective(), OptimConfig(lr=1e-3, max_steps=0))
    with pytest.raises(InputError, match="trainer.max_steps"):
        fit(module, train, val, job(cfg, tmp_path / "sft", max_steps=0))


def test_with_ema_enabled_the_weights_to_save_are_the_ema_average_and_training_weights_stay_live(tmp_path):
    model, tok = trainable_tiny_model()
    examples = board_examples(24)
    cfg = stage_cfg(tmp_path, val_check_interval=2, warmup_steps=1, lr=3e-3)
    cfg.trainer.ema = {"enable": True, "decay": 0.5}
    cfg.logger.mode = "disabled"
    train, val = make_loaders(examples[:16], examples[16:], cfg.trainer, CANVAS, tok.pad_token_id, seed=0)
    module = BlockDiffusionModule(model, UniformObjective(), OptimConfig.from_trainer_cfg(cfg.trainer, 3))
    _, trainer = fit(module, train, val, job(cfg, tmp_path / "sft", max_steps=3))
    key = "model.decoder.layers.0.self_attn.q_proj.weight"
    live = model.state_dict()[key].clone()
    ema = final_state_dict(trainer, model)
    assert ema is not None and not torch.equal(ema[key], live)
    assert torch.equal(model.state_dict()[key], live)
    assert list((tmp_path / "sft" / "exp" / "checkpoints").glob("*-EMA.ckpt"))


def test_an_experiment_dir_is_kept_for_resume_only_by_the_same_run(tmp_path):
    exp = tmp_path / "exp"
    prepare_exp_dir(exp, "run-a", resume=True)
    (exp / "checkpoints" / "sft-3-last.ckpt").write_text("x")
    prepare_exp_dir(exp, "run-a", resume=True)
    assert (exp / "checkpoints" / "sft-3-last.ckpt").exists()  # same config and input: resume
    prepare_exp_dir(exp, "run-b", resume=True)
    assert not (exp / "checkpoints" / "sft-3-last.ckpt").exists()  # another config: start fresh
    (exp / "checkpoints" / "sft-3-last.ckpt").write_text("x")
    prepare_exp_dir(exp, "run-b", resume=False)
    assert not (exp / "checkpoints" / "sft-3-last.ckpt").exists()  # force / resume_if_exists=false: fresh


def test_an_interrupted_checkpoint_save_is_removed_and_the_run_resumes_from_the_last_complete_one(tmp_path, capsys):
    from nemo.utils.callbacks.nemo_model_checkpoint import NeMoModelCheckpoint

    model, tok = trainable_tiny_model()
    examples = board_examples(24)
    cfg = stage_cfg(tmp_path, val_check_interval=2, warmup_steps=1, lr=3e-3)
    cfg.logger.mode = "disabled"
    train, val = make_loaders(examples[:16], examples[16:], cfg.trainer, CANVAS, tok.pad_token_id, seed=0)
    objective = build_objective(cfg.objective, tok)

    def run(steps, resume=True):
        module = BlockDiffusionModule(trainable_tiny_model()[0], objective, OptimConfig.from_trainer_cfg(cfg.trainer, 5))
        return fit(module, train, val, job(cfg, tmp_path / "sft", max_steps=steps, fingerprint="f", resume=resume))[0]

    run(3)
    checkpoints = tmp_path / "sft" / "exp" / "checkpoints"
    last = checkpoints / "sft-3-last.ckpt"
    # A save killed half-way: NeMo's marker beside a truncated file.
    NeMoModelCheckpoint.set_checkpoint_unfinished_marker(last)
    last.write_bytes(last.read_bytes()[:100])
    capsys.readouterr()

    resumed = run(5)
    said = capsys.readouterr().out
    assert "sft-3-last.ckpt was still being written when the previous run stopped" in said
    assert resumed.resumed_from.endswith("sft-2.ckpt") and "resuming from" in said and "(step 2)" in said
    assert resumed.steps == 5
    assert not list(checkpoints.glob("*-unfinished")) and not last.exists()

    # force=true (resume=False) always starts clean, whatever is in the experiment dir.
    fresh = run(2, resume=False)
    assert fresh.resumed_from is None and fresh.steps == 2
