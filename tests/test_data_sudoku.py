"""Sudoku generation and validation: unique solutions, clue ranges, determinism, and errors that name the cell."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from dg_pipeline.core.errors import InputError
from dg_pipeline.data.sudoku import BoardError, check_clue_range, generate_boards, validate_board

GOOD_4 = ("1030040221000320", "1234341221434321")
GOOD_9_SOLUTION = (
    "534678912672195348198342567859761423426853791713924856961537284287419635345286179"
)


# ---------------------------------------------------------------- independent checkers (not the project's solver)


def all_4x4_grids() -> list[str]:
    """Every valid 4x4 grid (there are 288): rows are permutations stacked while columns and boxes stay distinct."""
    perms = ["".join(p) for p in itertools.permutations("1234")]

    def fits(rows: list[str], row: str) -> bool:
        r = len(rows)
        box_mate = rows[r - 1] if r % 2 else None  # the row sharing this row's boxes
        return all(row[c] not in {prev[c] for prev in rows} for c in range(4)) and (
            box_mate is None or all({row[c], row[c ^ 1]}.isdisjoint({box_mate[c], box_mate[c ^ 1]}) for c in (0, 2))
        )

    def extend(rows: list[str]) -> list[str]:
        if len(rows) == 4:
            return ["".join(rows)]
        return [grid for row in perms if fits(rows, row) for grid in extend(rows + [row])]

    return extend([])


def count_9x9_solutions(puzzle: str, limit: int = 2) -> int:
    """Plain set-based backtracking (most constrained cell first), written apart from the generator's solver."""
    grid = [int(ch) for ch in puzzle]

    def options(i: int) -> set[int]:
        r, c = divmod(i, 9)
        br, bc = 3 * (r // 3), 3 * (c // 3)
        used = {grid[r * 9 + k] for k in range(9)} | {grid[k * 9 + c] for k in range(9)}
        used |= {grid[(br + dr) * 9 + bc + dc] for dr in range(3) for dc in range(3)}
        return set(range(1, 10)) - used

    def search() -> int:
        blanks = [i for i, v in enumerate(grid) if v == 0]
        if not blanks:
            return 1
        cell = min(blanks, key=lambda i: len(options(i)))
        total = 0
        for digit in options(cell):
            grid[cell] = digit
            total += search()
            grid[cell] = 0
            if total >= limit:
                break
        return total

    return search()


def clues(puzzle: str) -> int:
    return sum(ch != "0" for ch in puzzle)


# ---------------------------------------------------------------- generation


def test_every_generated_4x4_board_has_exactly_one_solution_its_own_and_clues_in_range():
    boards = generate_boards(4, 300, min_clues=4, max_clues=10, seed=3)
    grids = all_4x4_grids()
    assert len(grids) == 288
    for board in boards:
        matches = [g for g in grids if all(p in ("0", s) for p, s in zip(board.puzzle, g))]
        assert matches == [board.solution], board
        assert 4 <= clues(board.puzzle) <= 10
    # The range is covered, down to the 4-clue minimum.
    assert {clues(b.puzzle) for b in boards} == set(range(4, 11))


def test_every_clue_count_gets_its_share_down_to_the_floor():
    # Repair overshoots most at 4 clues; without the exact-target retries 4-clue boards were ~9% instead of 1/7.
    counts = Counter(clues(b.puzzle) for b in generate_boards(4, 1400, min_clues=4, max_clues=10, seed=4))
    assert min(counts.values()) >= 150 and counts[4] >= 170, counts


def test_clue_weights_set_how_often_each_clue_count_is_drawn():
    boards = generate_boards(4, 1000, min_clues=4, max_clues=6, seed=4, clue_weights=[3, 1, 0])
    counts = Counter(clues(b.puzzle) for b in boards)
    assert counts[6] == 0 and 650 <= counts[4] <= 850, counts


@pytest.mark.parametrize("weights", [[1, 1], [1, -1, 1], [0, 0, 0], ["a", 1, 1]])
def test_bad_clue_weights_are_refused_naming_the_key_and_the_count_expected(weights):
    with pytest.raises(InputError, match=r"data.clue_weights=.*expected 3 non-negative numbers, one per clue count 4..6"):
        generate_boards(4, 10, min_clues=4, max_clues=6, seed=1, clue_weights=weights)


@pytest.mark.parametrize("min_clues,max_clues,n", [(30, 45, 12), (25, 29, 4)])
def test_every_generated_9x9_board_has_exactly_one_solution_and_clues_in_range(min_clues, max_clues, n):
    boards = generate_boards(9, n, min_clues=min_clues, max_clues=max_clues, seed=5)
    for board in boards:
        validate_board(board.puzzle, board.solution, size=9)  # the solution is a valid grid keeping every clue
        assert count_9x9_solutions(board.puzzle) == 1, board.puzzle
        assert min_clues <= clues(board.puzzle) <= max_clues


def test_the_same_seed_gives_the_same_boards_whatever_the_number_of_workers():
    one_worker = generate_boards(4, 250, 4, 10, seed=11, workers=1)
    two_workers = generate_boards(4, 250, 4, 10, seed=11, workers=2)
    other_seed = generate_boards(4, 250, 4, 10, seed=12, workers=1)
    assert one_worker == two_workers
    assert one_worker != other_seed


def test_a_longer_request_extends_a_shorter_one():
    assert generate_boards(4, 300, 5, 9, seed=1)[:120] == generate_boards(4, 120, 5, 9, seed=1)


def test_generated_puzzles_are_distinct_and_skip_excluded_puzzles():
    first = generate_boards(4, 50, 4, 8, seed=2)
    rest = generate_boards(4, 400, 4, 8, seed=2, exclude=[b.puzzle for b in first])
    puzzles = [b.puzzle for b in rest]
    assert len(set(puzzles)) == len(puzzles)
    assert not set(puzzles) & {b.puzzle for b in first}


@pytest.mark.parametrize(
    "size,min_clues,max_clues,says",
    [
        (4, 3, 8, "data.min_clues=3: no 4x4 board with fewer than 4 clues has a unique solution"),
        (9, 17, 30, "data.min_clues=17"),
        (4, 4, 16, "data.max_clues=16: a 4x4 board has 16 cells and needs at least one blank"),
        (9, 40, 30, "data.min_clues=40 > data.max_clues=30"),
        (5, 10, 12, "data.size=5: unsupported board size"),
    ],
)
def test_an_impossible_clue_range_is_refused_naming_the_key_and_the_limit(size, min_clues, max_clues, says):
    with pytest.raises(InputError, match="fix:") as err:
        check_clue_range(size, min_clues, max_clues)
    assert says in str(err.value)


def test_the_9x9_floor_explains_why_and_what_to_use():
    with pytest.raises(InputError) as err:
        generate_boards(9, 1, min_clues=20, max_clues=30, seed=0)
    assert "17 is the proven minimum" in str(err.value) and "data.min_clues>=22" in str(err.value)


# ---------------------------------------------------------------- validation


def test_a_good_pair_passes_and_dots_become_blanks():
    puzzle = GOOD_4[0].replace("0", ".")
    assert validate_board(puzzle, GOOD_4[1]) == GOOD_4


def test_a_board_of_the_wrong_length_says_how_long_it_is():
    with pytest.raises(BoardError, match="puzzle has 80 characters, expected 81 for a 9x9 board"):
        validate_board("0" * 80, GOOD_9_SOLUTION, size=9)
    with pytest.raises(BoardError, match="puzzle has 15 characters"):
        validate_board("0" * 15, GOOD_4[1])


def test_a_bad_character_names_its_row_and_column():
    with pytest.raises(BoardError, match=r"puzzle has non-digit character 'x' at row 2 col 3"):
        validate_board("1030" + "04x2" + "21000320", GOOD_4[1])
    with pytest.raises(BoardError, match=r"puzzle has digit '7' at row 1 col 1 .*use digits 1-4"):
        validate_board("7030002404013020", GOOD_4[1])
    with pytest.raises(BoardError, match=r"solution has a blank at row 4 col 4"):
        validate_board(GOOD_4[0], GOOD_4[1][:-1] + "0")


def test_a_repeated_digit_names_the_row_column_or_box():
    row_broken = "2" + GOOD_9_SOLUTION[1:]  # row 1 now has two 2s
    with pytest.raises(BoardError, match=r"solution repeats 2 in row 1 \(at row 1 col 1 and row 1 col 9\)"):
        validate_board("0" * 81, row_broken)
    col_broken = GOOD_4[1][1] + GOOD_4[1][0] + GOOD_4[1][2:]  # swap two cells of row 1: rows stay valid
    with pytest.raises(BoardError, match=r"solution repeats 2 in col 1 \(at row 1 col 1 and row 3 col 1\)"):
        validate_board("0" * 16, col_broken)
    latin_not_sudoku = "1234" "2341" "3412" "4123"  # rows and columns fine, boxes not
    with pytest.raises(BoardError, match=r"solution repeats 2 in box 1 \(rows 1-2, cols 1-2\)"):
        validate_board("0" * 16, latin_not_sudoku)


def test_a_solution_that_contradicts_a_clue_names_the_cell_and_both_digits():
    puzzle = GOOD_4[0][:6] + "3" + GOOD_4[0][7:]  # row 2 col 3 clue 3, the solution has 1
    with pytest.raises(BoardError, match=r"solution contradicts clue at row 2 col 3: the puzzle has 3, the solution 1"):
        validate_board(puzzle, GOOD_4[1])
