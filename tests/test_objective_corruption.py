"""Specification of the noising processes and a training step's random choices (dg_pipeline.objective.corruption)."""

import torch

from dg_pipeline.data.collate import collate
from dg_pipeline.data.examples import Example
from dg_pipeline.data.tokenizer import build_board_tokenizer
from dg_pipeline.model import build_config
from dg_pipeline.objective import UniformObjective
from dg_pipeline.objective.corruption import (
    TRAIN_STREAM,
    VALIDATION_STREAM,
    NoiseKey,
    choose_blocks,
    corrupted_positions,
    corruption_levels,
    draw_example_noise,
    mask_corrupt,
    self_conditioning_rows,
    uniform_corrupt,
)

VOCAB = 16
MASK_ID = 4


def uniform(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_corruption_levels_are_uniform_between_t_eps_and_one():
    t = corruption_levels(uniform(20000), t_eps=0.2)
    assert t.min() >= 0.2 and t.max() <= 1.0
    assert abs(t.mean().item() - 0.6) < 0.01
    # Each decile of [0.2, 1] holds ~10% of the draws.
    counts = torch.histc(t, bins=10, min=0.2, max=1.0) / t.numel()
    assert torch.all((counts - 0.1).abs() < 0.015)


def test_fraction_corrupted_follows_each_rows_t():
    t = torch.tensor([0.1, 0.5, 0.9])
    corrupted = corrupted_positions(uniform(3, 20000), t)
    assert torch.allclose(corrupted.float().mean(1), t, atol=0.01)


def test_uniform_noise_tokens_are_uniform_over_the_full_vocabulary_including_special_tokens():
    batch = {"input_ids": torch.zeros(64, 1, dtype=torch.long)}
    draws = draw_example_noise(NoiseKey(0), batch, canvas_length=1000, vocab_size=VOCAB)
    noised = uniform_corrupt(torch.full((64, 1000), 7), torch.ones(64, 1000, dtype=torch.bool), draws.tokens)
    frequencies = torch.bincount(noised.flatten(), minlength=VOCAB).float() / noised.numel()
    # Every id 0..V-1 (pad, eos, bos, ... digits) is drawn, each ~1/V, as inference's randint(0, V) canvas.
    assert frequencies.shape[0] == VOCAB
    assert torch.all((frequencies - 1 / VOCAB).abs() < 0.004)


def test_uncorrupted_positions_keep_their_clean_token():
    clean = torch.randint(0, VOCAB, (4, 500), generator=torch.Generator().manual_seed(1))
    corrupted = corrupted_positions(uniform(4, 500), torch.full((4,), 0.4))
    noised = uniform_corrupt(clean, corrupted, torch.randint(0, VOCAB, (4, 500)))
    assert torch.equal(noised[~corrupted], clean[~corrupted])


def test_mask_corruption_writes_only_the_mask_token():
    clean = torch.randint(6, VOCAB, (2, 5000), generator=torch.Generator().manual_seed(1))
    corrupted = corrupted_positions(uniform(2, 5000), torch.tensor([0.3, 0.7]))
    noised = mask_corrupt(clean, corrupted, MASK_ID)
    assert torch.all(noised[corrupted] == MASK_ID)
    assert torch.equal(noised[~corrupted], clean[~corrupted])
    assert torch.allclose(corrupted.float().mean(1), torch.tensor([0.3, 0.7]), atol=0.02)


def test_each_example_picks_one_of_its_own_blocks_uniformly():
    num_blocks = torch.tensor([1, 3] * 6000)
    chosen = choose_blocks(num_blocks, uniform(12000))
    assert torch.all(chosen[0::2] == 0)
    counts = torch.bincount(chosen[1::2], minlength=3).float() / 6000
    assert torch.all((counts - 1 / 3).abs() < 0.02)


def test_self_conditioning_is_switched_on_per_example_with_its_probability():
    on = self_conditioning_rows(uniform(20000), 0.5)
    assert on.dtype == torch.bool
    assert abs(on.float().mean().item() - 0.5) < 0.01
    assert not self_conditioning_rows(uniform(100), 0.0).any()
    assert self_conditioning_rows(uniform(100), 1.0).all()


def keyed_batch(keys):
    """A batch whose rows carry (epoch, example index) keys, as the training loader's collator sets them."""
    examples = [Example([2, 6, 7, 5], [8 + i % 4, 9, 1], {}) for i in range(len(keys))]
    return collate(examples, canvas_length=4, pad_id=0, keys=keys)


def test_an_examples_noise_depends_on_its_seed_epoch_and_index_not_on_its_batch_or_row():
    key = NoiseKey(seed=7)
    alone = draw_example_noise(key, keyed_batch([(0, 5)]), 4, VOCAB)
    among_others = draw_example_noise(key, keyed_batch([(0, 9), (0, 2), (0, 5)]), 4, VOCAB)
    for field in ("level", "block", "self_conditioning", "positions", "tokens"):
        assert torch.equal(getattr(alone, field)[0], getattr(among_others, field)[2]), field
    # Another epoch, seed or stream: other noise for the same example.
    for other in (draw_example_noise(key, keyed_batch([(1, 5)]), 4, VOCAB),
                  draw_example_noise(NoiseKey(seed=8), keyed_batch([(0, 5)]), 4, VOCAB),
                  draw_example_noise(NoiseKey(7, VALIDATION_STREAM), keyed_batch([(0, 5)]), 4, VOCAB)):
        assert not torch.equal(other.positions, alone.positions)
    assert TRAIN_STREAM != VALIDATION_STREAM


def test_the_prompt_is_never_corrupted_and_the_batch_is_not_modified():
    tok = build_board_tokenizer()
    canvas = 8
    model_config = build_config("tiny", len(tok), canvas)
    examples = [
        Example([2, 6, 7, 8, 5], [9, 10, 11, 1], {}),
        Example([2, 6, 7, 8, 9, 10, 11, 12, 13, 5], [9, 10, 11, 12, 13, 14, 15, 6, 7, 8, 1], {}),
    ]

    class ConfigOnly:  # noised_block reads only the config
        config = model_config

    objective = UniformObjective()
    for epoch in range(200):
        batch = collate(examples, canvas_length=canvas, pad_id=tok.pad_token_id, keys=[(epoch, 0), (epoch, 1)])
        before = batch["input_ids"].clone()
        block = objective.noised_block(ConfigOnly, batch, NoiseKey(0))
        # The canvas always starts at or after the prompt's end: prompt tokens never enter it.
        assert torch.all(block.starts >= batch["prompt_lengths"])
        assert torch.all(block.starts + canvas <= batch["prompt_lengths"] + batch["num_blocks"] * canvas)
        assert torch.equal(batch["input_ids"], before)
