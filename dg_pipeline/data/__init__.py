"""Data: Sudoku generation, readers for local files, the board tokenizer, and the batch collator."""
