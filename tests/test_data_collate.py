"""The batch layouts of docs/ARCHITECTURE.md: right-padded training rows in whole canvas blocks, left-padded prompts."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from dg_pipeline.data import (
    Board,
    Collator,
    Example,
    ExampleDataset,
    build_board_tokenizer,
    collate,
    left_padded_prompts,
    sudoku_examples,
)

PAD, EOS = 0, 1
CANVAS = 4
# Hand-built rows: prompt 3 + response 6 (2 blocks, 2 fill) and prompt 5 + response 4 (exactly 1 block).
LONG_RESPONSE = Example([2, 10, 5], [11, 12, 13, 14, 15, EOS], {})
EXACT_BLOCK = Example([2, 7, 8, 9, 5], [6, 7, 8, EOS], {})


def test_each_response_is_padded_to_whole_canvas_blocks_then_the_batch_to_its_longest_row():
    batch = collate([LONG_RESPONSE, EXACT_BLOCK], CANVAS, PAD)
    assert batch["input_ids"].tolist() == [
        [2, 10, 5, 11, 12, 13, 14, 15, EOS, PAD, PAD],  # 3 + 2 blocks of 4 (2 fill)
        [2, 7, 8, 9, 5, 6, 7, 8, EOS, PAD, PAD],  # 5 + 1 block of 4, then 2 batch padding
    ]
    assert batch["prompt_lengths"].tolist() == [3, 5]
    assert batch["response_lengths"].tolist() == [6, 4]  # real tokens, EOS included
    assert batch["num_blocks"].tolist() == [2, 1]


def test_with_an_eos_fill_the_block_after_eos_is_eos_and_only_the_batch_padding_stays_pad():
    batch = collate([LONG_RESPONSE, EXACT_BLOCK], CANVAS, PAD, fill_id=EOS)
    assert batch["input_ids"].tolist() == [
        [2, 10, 5, 11, 12, 13, 14, 15, EOS, EOS, EOS],  # the 2 fill positions of the last block
        [2, 7, 8, 9, 5, 6, 7, 8, EOS, PAD, PAD],  # past the row's blocks: batch padding, masked out
    ]
    assert Collator(CANVAS, PAD, fill_id=EOS)([(0, 0, LONG_RESPONSE)])["input_ids"].tolist() == [[2, 10, 5, 11, 12, 13, 14, 15, EOS, EOS, EOS]]


def test_the_attention_mask_covers_the_prompt_and_every_response_block_including_its_fill():
    mask = collate([LONG_RESPONSE, EXACT_BLOCK], CANVAS, PAD)["attention_mask"]
    assert mask.dtype == torch.bool
    assert mask.tolist() == [
        [True] * 11,  # prompt 3 + 8: the two fill <pad>s of block 2 are attended, as inference sees them
        [True] * 9 + [False] * 2,  # prompt 5 + 4; the batch padding is not
    ]


def test_block_k_of_a_row_starts_at_its_prompt_length_plus_k_canvases():
    batch = collate([LONG_RESPONSE, EXACT_BLOCK], CANVAS, PAD)
    for b, example in enumerate([LONG_RESPONSE, EXACT_BLOCK]):
        p, response = batch["prompt_lengths"][b].item(), example.response_ids
        for k in range(batch["num_blocks"][b].item()):
            block = batch["input_ids"][b, p + k * CANVAS : p + (k + 1) * CANVAS].tolist()
            expected = response[k * CANVAS : (k + 1) * CANVAS]
            assert block == expected + [PAD] * (CANVAS - len(expected))


def test_prompts_for_generation_are_left_padded_with_a_mask_that_hides_the_padding():
    ids, mask = left_padded_prompts([LONG_RESPONSE, EXACT_BLOCK], pad_id=PAD)
    assert ids.tolist() == [[PAD, PAD, 2, 10, 5], [2, 7, 8, 9, 5]]
    assert mask.tolist() == [[False, False, True, True, True], [True] * 5]


def test_an_example_without_a_response_is_refused():
    with pytest.raises(ValueError, match="empty response"):
        collate([Example([2, 5], [], {})], CANVAS, PAD)


def test_a_dataloader_over_sudoku_examples_gives_the_collate_layout():
    tok = build_board_tokenizer()
    boards = [Board("1030040221000320", "1234341221434321"), Board("0000341221430000", "1234341221434321")]
    examples = sudoku_examples(boards, tok)
    # The codec agrees with the tokenizer itself: <bos> board <sep> / solution <eos>.
    assert examples[0].prompt_ids == tok("<bos>1030040221000320<sep>", add_special_tokens=False)["input_ids"]
    assert examples[0].response_ids == tok("1234341221434321<eos>", add_special_tokens=False)["input_ids"]
    collator = Collator(canvas_length=8, pad_id=tok.pad_token_id)
    loader = DataLoader(ExampleDataset(examples), batch_size=2, collate_fn=collator)
    [batch] = list(loader)
    expected = collate(examples, 8, tok.pad_token_id)
    assert all(torch.equal(batch[k], expected[k]) for k in expected)
    assert batch["input_ids"].shape == (2, 18 + 24)  # 17 response tokens -> 3 blocks of 8
