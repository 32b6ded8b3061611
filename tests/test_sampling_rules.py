"""The sampler's small pieces, each alone: temperature schedule, entropy, acceptance rules, stopping rule, canvas
noise, categorical sampling, end-of-sequence padding."""

import math

import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
)

from dg_pipeline.sampling import (
    ConfidenceThresholdAcceptance,
    EntropyBoundAcceptance,
    LinearTemperatureSchedule,
    MaskCanvas,
    Prediction,
    StableAndConfidentStop,
    UniformCanvas,
    contains_eos,
    pad_after_eos,
    sample_categorical,
    token_entropy,
)


def prediction_from_entropy(entropy: torch.Tensor) -> Prediction:
    return Prediction(tempered_logits=torch.empty(0), probs=torch.empty(0), entropy=entropy)


def prediction_from_logits(logits: torch.Tensor) -> Prediction:
    return Prediction(logits, torch.softmax(logits, -1), token_entropy(logits))


# ------------------------------------------------------------------------------------------ temperature schedule


def test_temperature_is_t_max_on_the_first_step_and_falls_linearly_to_the_last():
    schedule = LinearTemperatureSchedule(t_min=0.4, t_max=0.8, num_steps=4)
    assert list(schedule.steps()) == [4, 3, 2, 1]  # steps count down, as the reference's
    assert [round(schedule(n), 6) for n in schedule.steps()] == [0.8, 0.7, 0.6, 0.5]


def test_tempered_logits_are_bit_identical_to_the_reference_processor():
    logits = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    schedule = LinearTemperatureSchedule(0.4, 0.8, 48)
    reference = LinearTemperatureScheduleLogitsProcessor(0.4, 0.8, 48)
    table = schedule.table()
    for n in (48, 31, 7, 1):
        expected = reference(None, logits, cur_step=torch.tensor(n, dtype=torch.int32))
        assert torch.equal(logits / table[n], expected)


# ------------------------------------------------------------------------------------------ entropy and acceptance


def test_entropy_is_log_v_for_uniform_logits_and_zero_for_a_certain_token():
    logits = torch.zeros(1, 2, 16)
    logits[0, 1, 3] = 1e4
    entropy = token_entropy(logits)
    assert entropy[0, 0].item() == pytest.approx(math.log(16), rel=1e-6)
    assert entropy[0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_is_bit_identical_to_torch_distributions():
    logits = torch.randn(3, 7, 50, generator=torch.Generator().manual_seed(1)) * 4
    assert torch.equal(token_entropy(logits), torch.distributions.Categorical(logits=logits).entropy())


def test_entropy_bound_accepts_the_lowest_entropies_whose_sum_minus_max_fits_the_bound():
    entropy = torch.tensor([[0.05, 0.2, 0.9, 0.01]])
    # Sorted: 0.01, 0.05, 0.2, 0.9 -> sum-minus-max of each prefix: 0, 0.01, 0.06, 0.26.
    accepted = EntropyBoundAcceptance(0.1)(prediction_from_entropy(entropy))
    assert accepted.tolist() == [[True, True, False, True]]


def test_entropy_bound_always_accepts_at_least_the_most_certain_position():
    entropy = torch.tensor([[5.0, 3.0, 4.0], [2.0, 2.5, 9.0]])
    accepted = EntropyBoundAcceptance(1e-6)(prediction_from_entropy(entropy))
    assert accepted.tolist() == [[False, True, False], [True, False, False]]


def test_entropy_bound_matches_the_reference_sampler_mask():
    logits = torch.randn(4, 32, 16, generator=torch.Generator().manual_seed(2)) * 3
    reference = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=1.5), 32, 16, 48)
    canvas = torch.zeros(4, 32, dtype=torch.long)
    reference.accept_canvas(canvas, canvas, logits, 48)
    ours = EntropyBoundAcceptance(1.5)(prediction_from_logits(logits))
    assert torch.equal(ours, reference.accepted_token_mask)
    assert 1 < int(ours.sum()) < ours.numel()  # the bound really splits the canvas


def test_confidence_rule_commits_every_confident_position():
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 0, 1] = logits[0, 2, 3] = 10.0  # positions 0 and 2 near-certain, position 1 uniform
    logits[0, 1] = 0.0
    accepted = ConfidenceThresholdAcceptance(0.9)(prediction_from_logits(logits))
    assert accepted.tolist() == [[True, False, True]]


def test_confidence_rule_commits_at_least_one_position_per_step():
    logits = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(3)) * 0.01  # nothing near 0.9
    accepted = ConfidenceThresholdAcceptance(0.9)(prediction_from_logits(logits))
    assert accepted.sum(-1).tolist() == [1, 1, 1]
    most_confident = torch.softmax(logits, -1).amax(-1).argmax(-1)
    assert accepted[torch.arange(3), most_confident].all()


# ------------------------------------------------------------------------------------------ stopping rule


def test_stop_needs_the_argmax_canvas_unchanged_for_threshold_steps_and_low_entropy():
    stop = StableAndConfidentStop(stability_threshold=2, confidence_threshold=0.1)
    stop.reset(batch_size=2, canvas_length=3)
    canvas = torch.tensor([[1, 2, 3], [4, 5, 6]])
    confident = torch.full((2, 3), 0.01)
    unsure = torch.tensor([[0.01] * 3, [0.5] * 3])
    assert stop(canvas, confident).tolist() == [False, False]  # nothing seen before
    assert stop(canvas, confident).tolist() == [False, False]  # seen once, threshold is 2
    assert stop(canvas, unsure).tolist() == [True, False]  # row 1 is stable but not confident
    changed = canvas.clone()
    changed[0, 0] = 9
    assert stop(changed, confident).tolist() == [False, True]  # row 0 changed


def test_stop_with_threshold_zero_only_asks_for_confidence():
    stop = StableAndConfidentStop(stability_threshold=0, confidence_threshold=0.1)
    stop.reset(1, 2)
    assert stop(torch.tensor([[3, 4]]), torch.tensor([[0.05, 0.1]])).tolist() == [True]
    assert stop(torch.tensor([[3, 4]]), torch.tensor([[0.05, 0.2]])).tolist() == [False]


def test_stop_on_a_subset_of_rows_keeps_each_rows_history():
    stop = StableAndConfidentStop(stability_threshold=1, confidence_threshold=1.0)
    stop.reset(3, 2)
    low = torch.zeros(3, 2)
    canvas = torch.tensor([[1, 1], [2, 2], [3, 3]])
    stop(canvas, low)
    rows = torch.tensor([0, 2])
    assert stop(canvas[rows], low[rows], rows).tolist() == [True, True]
    assert stop(torch.tensor([[1, 1], [7, 7]]), low[rows], rows).tolist() == [True, False]


# ------------------------------------------------------------------------------------------ canvas and sampling


def test_uniform_canvas_starts_random_and_renoises_only_rejected_positions():
    noise = UniformCanvas(vocab_size=16)
    canvas = noise.initial(2, 8, torch.Generator().manual_seed(0), "cpu")
    assert canvas.shape == (2, 8) and int(canvas.min()) >= 0 and int(canvas.max()) < 16
    accepted = torch.tensor([[True, False] * 4] * 2)
    fresh = torch.full((2, 8), 15)
    out = noise.renoise(torch.zeros(2, 8, dtype=torch.long), accepted, fresh)
    assert torch.equal(out, torch.where(accepted, 0, 15))


def test_mask_canvas_starts_all_mask_and_remasks_rejected_positions():
    noise = MaskCanvas(mask_token_id=4)
    assert torch.equal(noise.initial(2, 5, None, "cpu"), torch.full((2, 5), 4))
    assert noise.fresh_tokens(2, 5, None, "cpu") is None  # the masked objective draws no noise tokens
    accepted = torch.tensor([[True, False, True, False, False]])
    out = noise.renoise(torch.tensor([[9, 8, 7, 6, 5]]), accepted, None)
    assert out.tolist() == [[9, 4, 7, 4, 4]]


def test_categorical_sample_equals_torch_multinomial_for_the_same_seed():
    probs = torch.softmax(torch.randn(64, 100, generator=torch.Generator().manual_seed(4)), -1)
    expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(9)).squeeze(1)
    noise = torch.empty_like(probs).exponential_(1, generator=torch.Generator().manual_seed(9))
    assert torch.equal(sample_categorical(probs, noise), expected)


# ------------------------------------------------------------------------------------------ end of sequence


def test_tokens_after_the_first_eos_become_pad_and_the_eos_stays():
    tokens = torch.tensor([[5, 1, 6, 1, 7], [5, 6, 7, 8, 9]])
    eos = torch.tensor([1])
    assert pad_after_eos(tokens, eos, pad_id=0).tolist() == [[5, 1, 0, 0, 0], [5, 6, 7, 8, 9]]
    assert contains_eos(tokens, eos).tolist() == [True, False]
