"""Data: Sudoku generation and validation, readers for local files, the board tokenizer, examples and the collator.

Stages call `load_splits(settings.data, tokenizer, run_dir, seed)` (`load_eval_examples` for a gate alone);
training batches with `collate` (or `Collator` as a DataLoader collate_fn) in the seeded, rank-split, resumable
order of `GlobalBatchSampler` / `ResumableLoader`; the sampler/evaluator takes prompts from `left_padded_prompts`.
"""

from dg_pipeline.data.collate import Collator, ExampleDataset, blocks_for, collate, left_padded_prompts
from dg_pipeline.data.examples import (
    BoardCodec,
    Example,
    chat_example,
    chat_examples,
    render_prompt,
    sudoku_example,
    sudoku_examples,
)
from dg_pipeline.data.order import GlobalBatchSampler, ResumableLoader
from dg_pipeline.data.readers import (
    ChatRecord,
    read_boards,
    read_boards_jsonl,
    read_chat_jsonl,
    read_kaggle_csv,
    write_boards_jsonl,
)
from dg_pipeline.data.sources import Splits, load_eval_examples, load_splits, split_disjoint
from dg_pipeline.data.sudoku import (
    Board,
    BoardError,
    check_clue_range,
    count_solutions,
    find_solutions,
    generate_boards,
    validate_board,
)
from dg_pipeline.data.tokenizer import build_board_tokenizer, build_char_tokenizer

__all__ = [
    "Board",
    "BoardCodec",
    "BoardError",
    "ChatRecord",
    "Collator",
    "Example",
    "ExampleDataset",
    "GlobalBatchSampler",
    "ResumableLoader",
    "Splits",
    "blocks_for",
    "build_board_tokenizer",
    "build_char_tokenizer",
    "chat_example",
    "chat_examples",
    "check_clue_range",
    "collate",
    "count_solutions",
    "find_solutions",
    "generate_boards",
    "left_padded_prompts",
    "load_eval_examples",
    "load_splits",
    "read_boards",
    "read_boards_jsonl",
    "read_chat_jsonl",
    "read_kaggle_csv",
    "render_prompt",
    "split_disjoint",
    "sudoku_example",
    "sudoku_examples",
    "validate_board",
    "write_boards_jsonl",
]
