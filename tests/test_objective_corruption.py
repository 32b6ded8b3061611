"""Specification of the noising processes and a training step's random choices (dg_pipeline.objective.corruption)."""

import torch

from dg_pipeline.data.collate import collate
from dg_pipeline.data.examples import Example
from dg_pipeline.data.tokenizer import build_board_tokenizer
from dg_pipeline.model import build_config
from dg_pipeline.objective import UniformObjective
from dg_pipeline.objective.corruption import (
    choose_blocks,
    mask_corrupt,
    sample_corruption_levels,
    sample_self_conditioning,
    uniform_corrupt,
)

VOCAB = 16
MASK_ID = 4


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_corruption_levels_are_uniform_between_t_eps_and_one():
    t = sample_corruption_levels(20000, t_eps=0.2, generator=gen())
    assert t.min() >= 0.2 and t.max() <= 1.0
    assert abs(t.mean().item() - 0.6) < 0.01
    # Each decile of [0.2, 1] holds ~10% of the draws.
    counts = torch.histc(t, bins=10, min=0.2, max=1.0) / t.numel()
    assert torch.all((counts - 0.1).abs() < 0.015)


def test_fraction_corrupted_follows_each_rows_t():
    clean = torch.full((3, 20000), 7)
    t = torch.tensor([0.1, 0.5, 0.9])
    _, corrupted = uniform_corrupt(clean, t, VOCAB, gen())
    assert torch.allclose(corrupted.float().mean(1), t, atol=0.01)


def test_uniform_noise_is_uniform_over_the_full_vocabulary_including_special_tokens():
    clean = torch.full((1, 64000), 7)
    noised, corrupted = uniform_corrupt(clean, torch.ones(1), VOCAB, gen())
    assert corrupted.all()
    frequencies = torch.bincount(noised.flatten(), minlength=VOCAB).float() / noised.numel()
    # Every id 0..V-1 (pad, eos, bos, ... digits) is drawn, each ~1/V, as inference's randint(0, V) canvas.
    assert frequencies.shape[0] == VOCAB
    assert torch.all((frequencies - 1 / VOCAB).abs() < 0.004)


def test_uncorrupted_positions_keep_their_clean_token():
    clean = torch.randint(0, VOCAB, (4, 500), generator=gen(1))
    noised, corrupted = uniform_corrupt(clean, torch.full((4,), 0.4), VOCAB, gen())
    assert torch.equal(noised[~corrupted], clean[~corrupted])


def test_mask_corruption_writes_only_the_mask_token():
    clean = torch.randint(6, VOCAB, (2, 5000), generator=gen(1))
    noised, corrupted = mask_corrupt(clean, torch.tensor([0.3, 0.7]), MASK_ID, gen())
    assert torch.all(noised[corrupted] == MASK_ID)
    assert torch.equal(noised[~corrupted], clean[~corrupted])
    assert torch.allclose(corrupted.float().mean(1), torch.tensor([0.3, 0.7]), atol=0.02)


def test_each_example_picks_one_of_its_own_blocks_uniformly():
    num_blocks = torch.tensor([1, 3] * 6000)
    chosen = choose_blocks(num_blocks, gen())
    assert torch.all(chosen[0::2] == 0)
    counts = torch.bincount(chosen[1::2], minlength=3).float() / 6000
    assert torch.all((counts - 1 / 3).abs() < 0.02)


def test_self_conditioning_is_switched_on_per_example_with_its_probability():
    on = sample_self_conditioning(20000, 0.5, gen())
    assert on.dtype == torch.bool
    assert abs(on.float().mean().item() - 0.5) < 0.01
    assert not sample_self_conditioning(100, 0.0, gen()).any()
    assert sample_self_conditioning(100, 1.0, gen()).all()


def test_the_prompt_is_never_corrupted_and_the_batch_is_not_modified():
    tok = build_board_tokenizer()
    canvas = 8
    model_config = build_config("tiny", len(tok), canvas)
    examples = [
        Example([2, 6, 7, 8, 5], [9, 10, 11, 1], {}),
        Example([2, 6, 7, 8, 9, 10, 11, 12, 13, 5], [9, 10, 11, 12, 13, 14, 15, 6, 7, 8, 1], {}),
    ]
    batch = collate(examples, canvas_length=canvas, pad_id=tok.pad_token_id)
    before = batch["input_ids"].clone()

    class ConfigOnly:  # noised_block reads only the config
        config = model_config

    objective = UniformObjective()
    g = gen()
    for _ in range(200):
        block = objective.noised_block(ConfigOnly, batch, g)
        # The canvas always starts at or after the prompt's end: prompt tokens never enter it.
        assert torch.all(block.starts >= batch["prompt_lengths"])
        assert torch.all(block.starts + canvas <= batch["prompt_lengths"] + batch["num_blocks"] * canvas)
    assert torch.equal(batch["input_ids"], before)
