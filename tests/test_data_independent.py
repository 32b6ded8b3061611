"""The independent held-out board source: valid unique boards at exact clue counts, reproducible from its own seed,
a different procedure from the training generator, and never part of the training data."""

from __future__ import annotations

import ast
import collections
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError
from test_data_sudoku import all_4x4_grids, count_9x9_solutions

from dg_pipeline.core.errors import InputError
from dg_pipeline.data import build_board_tokenizer, generate_boards, load_splits, validate_board
from dg_pipeline.data.independent import all_grids, independent_boards, row_major_grid
from dg_pipeline.data.sudoku import count_solutions
from dg_pipeline.settings import DataSettings, group_settings

REPO = Path(__file__).resolve().parents[1]


def clues(puzzle: str) -> int:
    return sum(ch != "0" for ch in puzzle)


def sudoku_cfg(**overrides) -> DataSettings:
    group = OmegaConf.load(REPO / "conf" / "data" / "sudoku4.yaml")
    return group_settings(DataSettings, group, {"n_train": 300, "n_val": 40, "n_eval": 60, "workers": 1, **overrides})


def test_4x4_boards_are_valid_unique_and_spread_evenly_over_exactly_the_requested_clue_counts():
    boards = independent_boards(4, 70, 4, 10, seed=3)
    assert len({b.puzzle for b in boards}) == 70
    for b in boards:
        validate_board(b.puzzle, b.solution)
        assert count_solutions(b.puzzle) == 1
    assert collections.Counter(clues(b.puzzle) for b in boards) == {k: 10 for k in range(4, 11)}


def test_9x9_boards_are_valid_and_unique_by_a_solver_written_apart_from_the_project():
    boards = independent_boards(9, 4, 40, 43, seed=3)
    assert sorted(clues(b.puzzle) for b in boards) == [40, 41, 42, 43]
    for b in boards:
        validate_board(b.puzzle, b.solution)
        assert count_9x9_solutions(b.puzzle) == 1


def test_the_boards_are_a_function_of_their_own_seed():
    assert independent_boards(4, 30, 4, 10, seed=5) == independent_boards(4, 30, 4, 10, seed=5)
    assert independent_boards(4, 30, 4, 10, seed=5) != independent_boards(4, 30, 4, 10, seed=6)
    # A longer request extends a shorter one (board i depends on i alone).
    assert independent_boards(4, 40, 4, 10, seed=5)[:30] == independent_boards(4, 30, 4, 10, seed=5)


def test_its_grids_come_from_other_samplers_than_the_training_generator():
    # 4x4: a uniform pick among all 288 grids (checked against an enumeration written apart from the solver).
    assert sorted("".join(map(str, g)) for g in all_grids(4)) == sorted(all_4x4_grids())
    # 9x9: row-major fill; a valid complete grid.
    import random

    grid = "".join(map(str, row_major_grid(9, random.Random(0))))
    validate_board(grid, grid)


def test_with_the_same_seed_and_range_the_two_generators_make_different_boards():
    training = generate_boards(4, 300, 4, 10, seed=11)
    independent = independent_boards(4, 300, 4, 10, seed=11)
    shared = {b.puzzle for b in training} & {b.puzzle for b in independent}
    assert len(shared) < 15  # 4x4 has few low-clue puzzles, so a handful may coincide by chance; never the streams
    # The training generator's clue counts follow its repair/trim, not an even spread.
    assert collections.Counter(clues(b.puzzle) for b in training) != collections.Counter(
        clues(b.puzzle) for b in independent
    )


def test_the_eval_side_carries_the_independent_set_tagged_by_source(tmp_path):
    splits = load_splits(sudoku_cfg(), build_board_tokenizer(), tmp_path, seed=1)
    assert {e.meta["eval_source"] for e in splits.eval} == {"pipeline"}
    assert {e.meta["eval_source"] for e in splits.independent} == {"independent"}
    assert len(splits.independent) == 60  # n_eval null = as many as the eval split
    expected = independent_boards(4, 60, 4, 10, seed=sudoku_cfg().independent.seed)
    assert [e.meta["puzzle"] for e in splits.independent] == [b.puzzle for b in expected]
    assert splits.gate_examples() == [*splits.eval, *splits.independent]
    # Its own seed: the global seed moves the training data, not the held-out set.
    other = load_splits(sudoku_cfg(), build_board_tokenizer(), tmp_path / "other", seed=2)
    assert [e.meta for e in other.independent] == [e.meta for e in splits.independent]


def test_training_data_is_disjoint_from_the_independent_set_even_where_the_generators_collide(tmp_path):
    # Only 4-clue boards: few enough distinct puzzles that the training stream hits independent ones.
    cfg = sudoku_cfg(min_clues=4, max_clues=4, clue_weights=None, n_train=2000, n_val=100, n_eval=20,
                     independent={"n_eval": 200})
    held_out = {b.puzzle for b in independent_boards(4, 200, 4, 4, seed=cfg.independent.seed)}
    stream = generate_boards(4, 2120, 4, 4, seed=1)
    assert held_out & {b.puzzle for b in stream}, "the test needs collisions to mean something"

    splits = load_splits(cfg, build_board_tokenizer(), tmp_path, seed=1)
    trained = {e.meta["puzzle"] for e in splits.train} | {e.meta["puzzle"] for e in splits.val}
    assert {e.meta["puzzle"] for e in splits.independent} == held_out
    assert not trained & held_out
    # Every training board is a board of the training generator's own stream: nothing else flows in.
    assert trained <= {b.puzzle for b in generate_boards(4, 2400, 4, 4, seed=1)}


def test_a_training_file_loses_the_rows_that_are_independent_boards(tmp_path):
    held = independent_boards(4, 30, 4, 10, seed=7)
    rows = generate_boards(4, 80, 4, 10, seed=2) + held[:10]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(f'{{"puzzle": "{b.puzzle}", "solution": "{b.solution}"}}\n' for b in rows))
    cfg = sudoku_cfg(train_path=str(path), n_train=None, n_val=5, n_eval=30, independent={"seed": 7, "n_eval": 30})
    splits = load_splits(cfg, build_board_tokenizer(), tmp_path, seed=0)
    trained = {e.meta["puzzle"] for e in splits.train} | {e.meta["puzzle"] for e in splits.val}
    assert not trained & {b.puzzle for b in held}
    assert {e.meta["eval_source"] for e in splits.eval} == {"file"}


def test_only_the_eval_side_of_the_data_package_imports_the_independent_generator():
    importers = []
    for path in sorted((REPO / "dg_pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "dg_pipeline.data.independent":
                importers.append(path.relative_to(REPO).as_posix())
    assert importers == ["dg_pipeline/data/sources.py"]


def test_bad_independent_settings_name_their_key():
    with pytest.raises(ValidationError, match=r"independent\.seed"):
        sudoku_cfg(independent={"seed": "x"})
    with pytest.raises(InputError, match=r"data\.independent\.n_eval=-1"):
        sudoku_cfg(independent={"n_eval": -1})


def test_clue_weights_shape_the_generated_splits_and_never_the_independent_set(tmp_path):
    tok = build_board_tokenizer()
    splits = load_splits(sudoku_cfg(clue_weights=[1, 0, 0, 0, 0, 0, 0]), tok, tmp_path, seed=1)
    assert {clues(e.meta["puzzle"]) for e in [*splits.train, *splits.val, *splits.eval]} == {4}
    assert {clues(e.meta["puzzle"]) for e in splits.independent} == set(range(4, 11))
    with pytest.raises(InputError, match=r"data.clue_weights=.*one per clue count 4..10"):
        load_splits(sudoku_cfg(clue_weights=[1, 1]), tok, tmp_path / "bad", seed=1)
