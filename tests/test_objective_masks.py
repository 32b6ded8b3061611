"""Specification of what the decoder sees in training (dg_pipeline.objective.masks + the decoder pass in losses).

The reference is the Hugging Face model itself: the training-time logits of a block must equal
`DiffusionGemmaForBlockDiffusion(input_ids=prefix, decoder_input_ids=canvas)` run with an ordinary (sliding-window)
encoder cache of the same prefix, including prefixes longer than the sliding window.
"""

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion
from transformers.cache_utils import DynamicCache

from dg_pipeline.core.errors import InputError
from dg_pipeline.data.collate import collate
from dg_pipeline.data.examples import Example
from dg_pipeline.data.tokenizer import build_board_tokenizer
from dg_pipeline.model import build_config
from dg_pipeline.objective.losses import denoise_block, encode_clean_sequence
from dg_pipeline.objective.masks import (
    block_context_mask_function,
    canvas_position_ids,
    decoder_attention_masks,
    sliding_context_window,
)

CANVAS = 8  # the tiny config's sliding window is also 8: prefixes of 13 and 21 tokens overflow it


@pytest.fixture(scope="module")
def tiny():
    tok = build_board_tokenizer()
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(build_config("tiny", len(tok), CANVAS)).eval()
    return model, tok


@pytest.fixture(scope="module")
def batch(tiny):
    _, tok = tiny
    g = torch.Generator().manual_seed(1)

    def digits(n):
        return torch.randint(6, 16, (n,), generator=g).tolist()

    examples = [
        # prompt 5, response 19 + EOS -> 3 blocks; block starts 5, 13, 21 (the last two prefixes exceed the window)
        Example([2, *digits(3), 5], digits(19) + [1], {}),
        # prompt 13 (already longer than the window), response 5 + EOS -> 1 block; right-padded in the batch
        Example([2, *digits(11), 5], digits(5) + [1], {}),
    ]
    return collate(examples, canvas_length=CANVAS, pad_id=tok.pad_token_id)


def hf_block_logits(model, prefix, canvas, self_conditioning_logits=None):
    """The model's own forward: encoder over the prefix into a normal (sliding-window) cache, then the decoder."""
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    out = model(
        input_ids=prefix[None],
        past_key_values=cache,
        decoder_input_ids=canvas[None],
        self_conditioning_logits=None if self_conditioning_logits is None else self_conditioning_logits[None],
    )
    return out.logits[0]


def training_block_logits(model, batch, starts, canvas, **kwargs):
    encoded = encode_clean_sequence(model, batch["input_ids"], batch["attention_mask"])
    return denoise_block(model, encoded.cache, canvas, starts, **kwargs)


def test_mask_shows_the_clean_prefix_and_the_canvas_but_never_the_block_or_later():
    starts = torch.tensor([6])
    visible = block_context_mask_function(starts, cache_length=10, window=None)
    kv = torch.arange(14)
    row = visible(torch.tensor(0), torch.tensor(0), torch.tensor(0), kv)
    # cache keys 0..5 (before the block) + canvas keys 10..13; the block's own clean keys 6..9 are hidden
    assert row.tolist() == [True] * 6 + [False] * 4 + [True] * 4


def test_sliding_mask_keeps_window_minus_one_keys_ending_at_the_block_boundary_for_every_query():
    starts = torch.tensor([9])
    visible = block_context_mask_function(starts, cache_length=12, window=3)
    kv = torch.arange(12 + 4)
    rows = [visible(torch.tensor(0), torch.tensor(0), torch.tensor(q), kv).tolist() for q in range(4)]
    expected = [False] * 6 + [True] * 3 + [False] * 3 + [True] * 4
    assert rows == [expected] * 4  # the same window for every canvas query


def test_decoder_masks_have_one_4d_mask_per_layer_type(tiny):
    model, _ = tiny
    text_config = model.config.text_config
    masks = decoder_attention_masks(text_config, torch.tensor([5, 13]), 30, CANVAS, torch.float32)
    assert set(masks) == {"sliding_attention", "full_attention"}
    for mask in masks.values():
        assert mask.shape == (2, 1, CANVAS, 30 + CANVAS)
    assert sliding_context_window(text_config) == text_config.sliding_window - 1
    assert masks["full_attention"][1, 0, 0, :13].all()
    assert masks["sliding_attention"][1, 0, 0, :13].sum() == text_config.sliding_window - 1


def test_canvas_positions_continue_from_the_block_start():
    assert canvas_position_ids(torch.tensor([5, 13]), 3).tolist() == [[5, 6, 7], [13, 14, 15]]


@pytest.mark.parametrize(
    "row, block",
    [(0, 0), (0, 1), (0, 2), (1, 0)],
    ids=["prefix5", "prefix13-over-window", "prefix21-over-window", "prefix13-padded-row"],
)
def test_training_decoder_logits_equal_the_hf_forward_with_a_normal_encoder_cache(tiny, batch, row, block):
    model, tok = tiny
    starts = batch["prompt_lengths"] + torch.tensor([block if row == 0 else 0, block if row == 1 else 0]) * CANVAS
    canvas = torch.randint(0, len(tok), (2, CANVAS), generator=torch.Generator().manual_seed(block))
    with torch.no_grad():
        ours = training_block_logits(model, batch, starts, canvas)[row]
        start = int(starts[row])
        reference = hf_block_logits(model, batch["input_ids"][row, :start], canvas[row])
    delta = (ours - reference).abs().max().item()
    print(f"\nprefix={start} sliding_window={model.config.text_config.sliding_window} max|dlogits|={delta:.2e}")
    assert delta < 1e-4


def test_training_decoder_with_self_conditioning_equals_the_hf_forward(tiny, batch):
    model, tok = tiny
    starts = batch["prompt_lengths"] + torch.tensor([2, 0]) * CANVAS
    g = torch.Generator().manual_seed(3)
    canvas = torch.randint(0, len(tok), (2, CANVAS), generator=g)
    sc_logits = torch.randn(2, CANVAS, len(tok), generator=g)
    with torch.no_grad():
        ours = training_block_logits(model, batch, starts, canvas, self_conditioning_logits=sc_logits)
        for row in range(2):
            prefix = batch["input_ids"][row, : int(starts[row])]
            reference = hf_block_logits(model, prefix, canvas[row], sc_logits[row])
            assert (ours[row] - reference).abs().max().item() < 1e-4


def test_a_later_block_or_the_blocks_own_clean_tokens_never_change_its_logits(tiny, batch):
    model, _ = tiny
    starts = batch["prompt_lengths"] + torch.tensor([1, 0]) * CANVAS  # row 0: block 1 (positions 13..20)
    canvas = batch["input_ids"][:, :CANVAS].clone()
    with torch.no_grad():
        base = training_block_logits(model, batch, starts, canvas)

        later = dict(batch, input_ids=batch["input_ids"].clone())
        later["input_ids"][0, 21:29] = (later["input_ids"][0, 21:29] - 6 + 1) % 10 + 6  # block 2 changed
        assert torch.equal(training_block_logits(model, later, starts, canvas)[0], base[0])

        own = dict(batch, input_ids=batch["input_ids"].clone())
        own["input_ids"][0, 13:21] = (own["input_ids"][0, 13:21] - 6 + 1) % 10 + 6  # block 1's own clean tokens
        assert torch.equal(training_block_logits(model, own, starts, canvas)[0], base[0])

        # ...while the clean token right before the block is context, and does change them.
        earlier = dict(batch, input_ids=batch["input_ids"].clone())
        earlier["input_ids"][0, 12] = (earlier["input_ids"][0, 12] - 6 + 1) % 10 + 6
        assert not torch.allclose(training_block_logits(model, earlier, starts, canvas)[0], base[0])


def test_flash_attention_is_refused_with_the_fix(tiny):
    model, _ = tiny
    text_config = model.config.text_config.__class__.from_dict(model.config.text_config.to_dict())
    text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(InputError, match="attn_implementation in"):
        decoder_attention_masks(text_config, torch.tensor([5]), 10, CANVAS, torch.float32)
