"""Specification of the objectives' losses (dg_pipeline.objective.losses): which tokens are supervised, how the
block loss is weighted, the encoder AR loss, and self-conditioning."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import DiffusionGemmaForBlockDiffusion
from transformers.loss.loss_utils import ForCausalLMLoss

from dg_pipeline.core.errors import InputError
from dg_pipeline.data.collate import collate
from dg_pipeline.data.examples import Example
from dg_pipeline.data.tokenizer import build_board_tokenizer
from dg_pipeline.model import build_config
from dg_pipeline.model.logits import encoder_causal_lm_logits
from dg_pipeline.settings import ObjectiveSettings, group_settings
from dg_pipeline.objective import (EncoderARObjective, MaskedObjective, NoiseKey, UniformObjective, build_objective,
                                   fill_token_id)
from dg_pipeline.objective.losses import (
    NoisedBlock,
    ar_prediction_positions,
    denoise_block,
    encode_clean_sequence,
    self_conditioned_denoise,
)

CANVAS = 8
CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(scope="module")
def tiny():
    tok = build_board_tokenizer()
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(build_config("tiny", len(tok), CANVAS))
    return model, tok


@pytest.fixture(scope="module")
def batch(tiny):
    _, tok = tiny
    examples = [
        Example([2, 6, 7, 8, 5], [9, 10, 11, 12, 13, 14, 15, 6, 7, 8, 9, 1], {}),  # 12 tokens -> 2 blocks
        Example([2, 6, 7, 8, 9, 10, 11, 5], [12, 13, 1], {}),  # 3 tokens -> 1 block, 5 pad fill
    ]
    return collate(examples, canvas_length=CANVAS, pad_id=tok.pad_token_id)


def hand_block(t, supervised=None, corrupted=None):
    clean = torch.tensor([[6, 7, 8, 9]])
    return NoisedBlock(
        starts=torch.tensor([0]),
        clean=clean,
        noised=clean,
        corrupted=torch.tensor([[True, False, True, False]]) if corrupted is None else corrupted,
        supervised=torch.ones_like(clean, dtype=torch.bool) if supervised is None else supervised,
        t=torch.tensor([t]),
    )


def test_uniform_block_loss_is_flat_cross_entropy_over_corrupted_and_clean_tokens_without_1_over_t():
    logits = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(0))
    expected = F.cross_entropy(logits[0], torch.tensor([6, 7, 8, 9]))
    for t in (0.05, 0.5, 1.0):
        loss, n = UniformObjective().block_loss(logits, hand_block(t))
        assert n == 4
        assert torch.allclose(loss, expected)


def test_masked_block_loss_is_masked_cross_entropy_over_t_normalised_by_answer_length():
    logits = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(0))
    token_ce = F.cross_entropy(logits[0], torch.tensor([6, 7, 8, 9]), reduction="none")
    objective = MaskedObjective(mask_token_id=4)
    loss, n = objective.block_loss(logits, hand_block(0.25))
    assert n == 2  # only the two masked positions count
    assert torch.allclose(loss, (token_ce[0] + token_ce[2]) / 0.25 / 4)
    # The ELBO weight: halving t doubles the loss.
    assert torch.allclose(objective.block_loss(logits, hand_block(0.125))[0], 2 * loss)
    # Unsupervised positions leave the answer length (the normaliser) too.
    supervised = torch.tensor([[True, True, True, False]])
    assert torch.allclose(objective.block_loss(logits, hand_block(0.25, supervised))[0], loss * 4 / 3)


def test_the_loss_takes_the_chosen_block_its_labels_are_that_blocks_clean_tokens(tiny, batch):
    model, _ = tiny
    objective = UniformObjective(supervise_padding=False)
    torch.manual_seed(0)
    for seed in range(6):
        out = objective.loss(model, batch, NoiseKey(seed))
        block = objective.noised_block(model, batch, NoiseKey(seed))
        assert torch.equal(out.targets, block.clean)
        clean_blocks = [batch["input_ids"][0, 5:13], batch["input_ids"][0, 13:21]]
        assert any(torch.equal(out.targets[0], b) for b in clean_blocks)
        assert torch.equal(out.targets[1], batch["input_ids"][1, 8:16])
        # Row 1 has 3 real tokens (through EOS) and 5 pad fill, unsupervised here.
        assert out.supervised[1].tolist() == [True] * 3 + [False] * 5
        assert out.diffusion_tokens == int(out.supervised.sum())


def test_padding_fill_after_eos_is_supervised_by_default(tiny, batch):
    model, _ = tiny
    out = UniformObjective().loss(model, batch, NoiseKey(0))
    assert out.supervised.all()
    assert out.targets[1, 3:].tolist() == [0] * 5


def test_diffusion_gradient_reaches_only_the_clean_context_before_the_chosen_block(tiny, batch):
    """With the AR loss off, no gradient flows to the chosen block's own clean tokens nor anything after it."""
    model, _ = tiny
    captured = {}
    embed = model.model.encoder.language_model.embed_tokens

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["embeddings"] = output

    handle = embed.register_forward_hook(keep)
    try:
        objective = UniformObjective(ar_loss_weight=0.0, self_conditioning_prob=0.0)
        noise = NoiseKey(0)
        block = objective.noised_block(model, batch, NoiseKey(0))
        out = objective.loss(model, batch, noise)
        out.loss.backward()
    finally:
        handle.remove()
        model.zero_grad()
    grad_per_position = captured["embeddings"].grad.abs().sum(-1)
    for row in range(2):
        start = int(block.starts[row])
        assert torch.all(grad_per_position[row, :start] > 0)
        assert torch.all(grad_per_position[row, start:] == 0)


def test_encoder_ar_loss_equals_an_independent_causal_lm_loss_on_the_response(tiny, batch):
    model, _ = tiny
    out = EncoderARObjective().loss(model, batch, NoiseKey(0))
    labels = torch.full_like(batch["input_ids"], -100)
    for row in range(2):
        p, r = int(batch["prompt_lengths"][row]), int(batch["response_lengths"][row])
        labels[row, p : p + r] = batch["input_ids"][row, p : p + r]  # response through EOS, no pad fill
    with torch.no_grad():
        logits = encoder_causal_lm_logits(model, batch["input_ids"], batch["attention_mask"])
    reference = ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])
    assert out.ar_tokens == 12 + 3
    assert torch.allclose(out.ar_loss, reference, atol=1e-5)
    assert torch.allclose(out.loss, out.ar_loss) and out.diffusion_loss == 0


def test_ar_loss_scope_response_labels_the_response_through_eos_and_sequence_the_whole_clean_row(tiny, batch):
    # Row 0: prompt 5 + 12 response tokens (2 blocks, 4 fill); row 1: prompt 8 + 3 response tokens (1 block, 5 fill).
    response, _ = ar_prediction_positions(batch, "response")
    sequence, targets = ar_prediction_positions(batch, "sequence")
    # position i predicts token i+1: response = the positions before each response token (prompt end .. before EOS)
    assert response[0].nonzero().flatten().tolist() == list(range(4, 4 + 12))
    assert response[1].nonzero().flatten().tolist() == list(range(7, 7 + 3))
    # sequence = every position whose next token is inside the row: prompt, response and fill (row length - 1)
    assert sequence[0].nonzero().flatten().tolist() == list(range(0, 5 + 16 - 1))
    assert sequence[1].nonzero().flatten().tolist() == list(range(0, 8 + 8 - 1))
    assert torch.equal(targets[:, :-1], batch["input_ids"][:, 1:])
    model, _ = tiny
    assert UniformObjective(ar_loss_scope="sequence").loss(model, batch, NoiseKey(0)).ar_tokens == 20 + 15
    assert EncoderARObjective(ar_loss_scope="sequence").loss(model, batch, NoiseKey(0)).ar_tokens == 20 + 15


def test_ar_loss_scope_sequence_equals_an_independent_causal_lm_loss_on_every_real_token(tiny, batch):
    model, _ = tiny
    out = EncoderARObjective(ar_loss_scope="sequence").loss(model, batch, NoiseKey(0))
    labels = batch["input_ids"].masked_fill(~batch["attention_mask"], -100)
    with torch.no_grad():
        logits = encoder_causal_lm_logits(model, batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(out.ar_loss, ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1]), atol=1e-5)


def test_the_fill_token_switch_picks_pad_or_eos_and_names_a_bad_value():
    tok = build_board_tokenizer()
    group = OmegaConf.load(CONF / "objective" / "uniform.yaml")

    def objective(**changes) -> ObjectiveSettings:
        return group_settings(ObjectiveSettings, group, changes)

    assert fill_token_id(objective(), tok) == tok.pad_token_id  # the default
    assert fill_token_id(objective(fill_token="eos"), tok) == tok.eos_token_id
    with pytest.raises(InputError, match="objective.fill_token=mask: choose one of pad, eos"):
        objective(fill_token="mask")
    with pytest.raises(InputError, match="objective.ar_loss_scope=prompt: choose one of response, sequence"):
        objective(ar_loss_scope="prompt")
    assert build_objective(objective(ar_loss_scope="sequence"), tok).ar_loss_scope == "sequence"


def test_total_loss_is_diffusion_plus_weighted_ar(tiny, batch):
    model, _ = tiny
    out = UniformObjective(ar_loss_weight=0.3).loss(model, batch, NoiseKey(0))
    assert torch.allclose(out.loss, out.diffusion_loss + 0.3 * out.ar_loss)


def count_decoder_passes(model):
    passes = []
    hook = model.model.decoder.register_forward_hook(lambda *_: passes.append(torch.is_grad_enabled()))
    return passes, hook


def test_self_conditioning_mask_rows_off_see_no_signal_rows_on_see_pass_one_logits(tiny, batch):
    model, tok = tiny
    with torch.no_grad():
        encoded = encode_clean_sequence(model, batch["input_ids"], batch["attention_mask"])
    starts = batch["prompt_lengths"]
    canvas = torch.randint(0, len(tok), (2, CANVAS), generator=torch.Generator().manual_seed(0))
    passes, hook = count_decoder_passes(model)
    try:
        mixed = self_conditioned_denoise(model, encoded.cache, canvas, starts, torch.tensor([True, False]))
    finally:
        hook.remove()
    assert passes == [False, True]  # pass 1 without gradients, pass 2 with
    with torch.no_grad():
        plain = denoise_block(model, encoded.cache, canvas, starts)
        fed = denoise_block(model, encoded.cache, canvas, starts, self_conditioning_logits=plain)
    assert torch.allclose(mixed[1], plain[1], atol=1e-6)  # row off: exactly the signal-free forward
    assert torch.allclose(mixed[0], fed[0], atol=1e-6)  # row on: conditioned on pass 1's logits
    assert not torch.allclose(mixed[0], plain[0])


def test_without_self_conditioning_a_step_runs_one_decoder_pass(tiny, batch):
    model, _ = tiny
    passes, hook = count_decoder_passes(model)
    try:
        UniformObjective(self_conditioning_prob=0.0).loss(model, batch, NoiseKey(0))
        n_off = len(passes)
        UniformObjective(self_conditioning_prob=1.0).loss(model, batch, NoiseKey(0))
    finally:
        hook.remove()
    assert n_off == 1 and len(passes) == 3


def test_masked_objective_feeds_the_decoder_mask_tokens_and_never_uniform_noise(tiny, batch):
    model, tok = tiny
    objective = MaskedObjective(mask_token_id=tok.mask_token_id)
    block = objective.noised_block(model, batch, NoiseKey(0), t=1.0)
    assert torch.all(block.noised == tok.mask_token_id)
    out = objective.loss(model, batch, NoiseKey(0))
    assert torch.isfinite(out.loss)


def test_single_step_accuracy_counts_argmax_hits_on_supervised_and_on_answer_tokens(tiny, batch):
    model, _ = tiny
    acc = UniformObjective().denoising_accuracy(model, batch, 0.0, NoiseKey(0))
    assert acc.total == 2 * CANVAS and 0 <= acc.correct <= acc.total
    # Row 0's chosen block holds 8 or 4 answer tokens, row 1's holds 3 (two digits + EOS), whatever its fill.
    assert acc.answer_total in (8 + 3, 4 + 3) and 0 <= acc.answer_correct <= acc.answer_total


def test_build_objective_reads_the_conf_group_and_names_a_bad_key():
    tok = build_board_tokenizer()
    cfg = OmegaConf.load(CONF / "objective" / "masked.yaml")
    objective = build_objective(cfg, tok)
    assert isinstance(objective, MaskedObjective) and objective.mask_token_id == tok.mask_token_id
    assert isinstance(build_objective(OmegaConf.load(CONF / "objective" / "uniform.yaml"), tok), UniformObjective)
    with pytest.raises(InputError, match="objective.name=bogus"):
        build_objective(OmegaConf.merge(cfg, {"name": "bogus"}), tok)
    with pytest.raises(InputError, match="objective.t_eps"):
        build_objective(OmegaConf.merge(cfg, {"name": "uniform", "t_eps": 1.5}), tok)
