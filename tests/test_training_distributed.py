"""Specification of sharded training on 2 real processes (torchrun, gloo): one step of FSDP2 (plain, with
activation checkpointing, with expert parallelism) and of DDP at a global batch of 4 computes the loss and the
gradients of the same step on one process at batch 4; the sharded model gathers to rank 0 unchanged and its DCP
checkpoint reads back on one process. One torchrun launch (tests/dist_parity.py, the `parity` fixture of
conftest.py) serves every assertion."""

import pytest
import torch

from dg_pipeline.model.structure import untied_backbone_weights
from dg_pipeline.objective import NoiseKey, UniformObjective
from dg_pipeline.training.sharding import layer_members, sharding_units, tie_layer_modules

TOLERANCE = 1e-5


@pytest.mark.parametrize("layout", ["fsdp", "fsdp_activation_checkpointing", "fsdp_expert_parallel", "ddp"])
def test_two_ranks_compute_the_loss_and_gradients_of_one_rank_at_the_same_global_batch(parity, layout):
    result = parity[layout]
    assert result["loss_abs_diff"] <= TOLERANCE
    assert result["grad_max_abs_diff"] <= TOLERANCE
    assert not result["grad_names_differ"] and result["params_with_grads"] > 0


@pytest.mark.parametrize("layout", ["fsdp", "fsdp_activation_checkpointing", "fsdp_expert_parallel"])
def test_a_sharded_model_gathers_to_rank_zero_and_its_dcp_checkpoint_reads_back_on_one_process(parity, layout):
    assert parity[layout]["gathered_max_abs_diff"] == 0.0
    assert parity[layout]["dcp_one_process_max_abs_diff"] == 0.0


def tiny(seed=0):
    from dg_pipeline.data.tokenizer import build_board_tokenizer
    from dg_pipeline.model import build_config
    from transformers import DiffusionGemmaForBlockDiffusion

    tok = build_board_tokenizer()
    torch.manual_seed(seed)
    return DiffusionGemmaForBlockDiffusion(build_config("tiny", len(tok), 8)), tok


def test_tying_the_layer_modules_keeps_weights_names_and_outputs_and_every_layer_call_runs_each_member_once():
    from dg_pipeline.data.collate import collate
    from dg_pipeline.data.examples import Example

    model, tok = tiny()
    batch = collate([Example([2, 6, 7, 5], [8, 9, 1], {}), Example([2, 9, 5], [6, 7, 8, 9, 10, 1], {})], 8, 0)
    before = UniformObjective().loss(model, batch, NoiseKey(0)).loss
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    tie_layer_modules(model)
    tie_layer_modules(model)  # idempotent
    assert [n for n, _ in model.named_parameters(remove_duplicate=False)] == names
    assert untied_backbone_weights(model) == []
    assert torch.equal(UniformObjective().loss(model, batch, NoiseKey(0)).loss, before)
    enc, dec = model.model.encoder.language_model.layers[0], model.model.decoder.layers[0]
    for path, module in layer_members(enc):
        assert dec.get_submodule(path) is module

    calls = {}
    hooks = [m.register_forward_hook(lambda m, *_: calls.__setitem__(id(m), calls.get(id(m), 0) + 1))
             for _, m in layer_members(enc)]
    try:
        with torch.no_grad():
            dec(torch.randn(1, 8, 64), position_embeddings=model.model.decoder.rotary_emb(
                torch.randn(1, 8, 64), torch.arange(8)[None], enc.self_attn.layer_type), attention_mask=None)
    finally:
        for h in hooks:
            h.remove()
    assert set(calls.values()) == {1} and len(calls) == len(layer_members(enc))


def test_the_plan_lists_every_parameter_once_layers_experts_vision_then_the_root():
    model, _ = tiny()
    units = sharding_units(model)
    kinds = [u.kind for u in units]
    layers = model.config.text_config.num_hidden_layers
    assert kinds == ["experts", "layer"] * layers + ["vision", "root"]
    listed = [id(p) for u in units for p in u.params]
    assert len(listed) == len(set(listed)) == len({id(p) for p in model.parameters()})
    root = {id(p) for p in units[-1].params}
    assert id(model.lm_head.weight) in root and id(model.model.decoder.self_conditioning.up_proj.weight) in root
    # Under expert parallelism the experts are split across ranks, not listed in any FSDP unit.
    split = sharding_units(model, expert_parallel=True)
    assert "experts" not in {u.kind for u in split}
    assert id(model.model.encoder.language_model.layers[0].experts.gate_up_proj) not in {
        id(p) for u in split for p in u.params}


def test_the_trainer_precision_selects_bf16_gathered_parameters_with_fp32_gradient_reduction():
    from dg_pipeline.settings import ParallelSettings
    from dg_pipeline.training.sharding import mixed_precision_policy

    policy = mixed_precision_policy(ParallelSettings(strategy="fsdp", precision="bf16-mixed"))
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert mixed_precision_policy(ParallelSettings(strategy="fsdp")).param_dtype is None  # 32-true: fp32 all through


def test_scale_out_keys_are_checked_naming_the_key():
    from dg_pipeline.core.errors import InputError
    from dg_pipeline.settings.training import EmaSettings, LoraSettings, TrainerSettings

    def settings(**keys):
        return TrainerSettings(**{"strategy": "fsdp", **keys}).parallel

    assert settings(devices=2, num_nodes=3).world_size() == 6
    with pytest.raises(InputError, match="trainer.expert_parallel=2 needs trainer.strategy=fsdp"):
        settings(strategy="ddp", expert_parallel=2)
    with pytest.raises(InputError, match="trainer.precision=fp8"):
        settings(precision="fp8")
    with pytest.raises(InputError, match="trainer.strategy=zero3"):
        settings(strategy="zero3")
    with pytest.raises(InputError, match="trainer.lora.enabled=true with trainer.strategy=fsdp"):
        settings(lora=LoraSettings(enabled=True))
    with pytest.raises(InputError, match="trainer.ema.enable=true with trainer.strategy=fsdp"):
        settings(ema=EmaSettings(enable=True))
