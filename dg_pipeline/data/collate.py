"""Batches of Examples as tensors (docs/ARCHITECTURE.md, data contract).

Training layout (`collate`, right padding): each row is prompt + response, the response filled with `fill_id`
(<pad> by default; EOS as NeMo AutoModel's DiffusionGemma recipe does, objective.fill_token) to a whole number of
canvas blocks (block k of row b covers [prompt_len_b + k*C, prompt_len_b + (k+1)*C)), then the
batch right-padded to its longest row. Generation layout (`left_padded_prompts`): prompts only, left-padded so
every row's next token sits at the same position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.data import Dataset

from dg_pipeline.data.examples import Example


def blocks_for(response_length: int, canvas_length: int) -> int:
    """Canvas blocks a response of `response_length` tokens fills (the last one padded)."""
    return math.ceil(response_length / canvas_length)


def collate(examples: Sequence[Example], canvas_length: int, pad_id: int,
            keys: Sequence[tuple[int, int]] | None = None, fill_id: int | None = None) -> dict[str, torch.Tensor]:
    """input_ids (B,L), attention_mask (B,L) bool, prompt_lengths (B,), response_lengths (B,), num_blocks (B,),
    and each row's noise key: epoch (B,), example_index (B,) (`keys` = (epoch, dataset index) pairs; default:
    epoch 0, index = row). `fill_id`: the token after EOS up to the block end (None = pad_id); the batch padding
    past a row is pad_id."""
    if not examples:
        raise ValueError("collate needs at least one example")
    if canvas_length <= 0:
        raise ValueError(f"canvas_length must be positive, got {canvas_length}")
    prompt_lengths = [len(e.prompt_ids) for e in examples]
    response_lengths = [len(e.response_ids) for e in examples]
    if min(response_lengths) == 0:
        raise ValueError("an example has an empty response (it must end with EOS)")
    num_blocks = [blocks_for(r, canvas_length) for r in response_lengths]
    row_lengths = [p + n * canvas_length for p, n in zip(prompt_lengths, num_blocks)]
    width = max(row_lengths)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for b, (e, p, r, length) in enumerate(zip(examples, prompt_lengths, response_lengths, row_lengths)):
        input_ids[b, :p] = torch.as_tensor(e.prompt_ids, dtype=torch.long)
        input_ids[b, p : p + r] = torch.as_tensor(e.response_ids, dtype=torch.long)
        if fill_id is not None:
            input_ids[b, p + r : length] = fill_id
        attention_mask[b, :length] = True  # the block fill is attended: the model learns to emit <pad> after EOS
    keys = list(keys) if keys is not None else [(0, b) for b in range(len(examples))]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "prompt_lengths": torch.tensor(prompt_lengths, dtype=torch.long),
        "response_lengths": torch.tensor(response_lengths, dtype=torch.long),
        "num_blocks": torch.tensor(num_blocks, dtype=torch.long),
        "epoch": torch.tensor([e for e, _ in keys], dtype=torch.long),
        "example_index": torch.tensor([i for _, i in keys], dtype=torch.long),
    }


def left_padded_prompts(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_ids (B,P) left-padded with `pad_id`, attention_mask (B,P) bool, False on the padding)."""
    if not examples:
        raise ValueError("left_padded_prompts needs at least one example")
    width = max(len(e.prompt_ids) for e in examples)
    prompt_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for b, e in enumerate(examples):
        p = len(e.prompt_ids)
        prompt_ids[b, width - p :] = torch.as_tensor(e.prompt_ids, dtype=torch.long)
        attention_mask[b, width - p :] = True
    return prompt_ids, attention_mask


class ExampleDataset(Dataset):
    """A map-style torch Dataset over a list of Examples. Indexed by a dataset index, or by an (epoch, index) key
    (`dg_pipeline.data.order.GlobalBatchSampler`), it returns (epoch, index, Example): the key travels with the
    example into the batch, where it seeds the example's noise."""

    def __init__(self, examples: Sequence[Example]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[int, int, Example]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        return epoch, index, self.examples[index]


@dataclass(frozen=True)
class Collator:
    """`collate` with fixed canvas length and pad id: a picklable DataLoader collate_fn (works with workers) over
    ExampleDataset items."""

    canvas_length: int
    pad_id: int
    fill_id: int | None = None

    def __call__(self, items: Sequence[tuple[int, int, Example]]) -> dict[str, torch.Tensor]:
        return collate([e for _, _, e in items], self.canvas_length, self.pad_id,
                       keys=[(epoch, index) for epoch, index, _ in items], fill_id=self.fill_id)
