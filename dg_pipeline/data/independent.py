"""An independent Sudoku board source, for held-out evaluation only: never a training source.

The training generator (`sudoku.py`) and this one share nothing but the uniqueness oracle (`count_solutions`):

| step | training generator (`sudoku.make_board`) | independent generator (`dig_out_board`) |
|---|---|---|
| full grid | random digits in the diagonal boxes, then randomised most-constrained-first backtracking | 4x4: uniform over all 288 grids; 9x9: row-major fill, random candidate order, chronological backtracking |
| clues | keep a random subset of `target` cells, *add* clues where a second solution disagrees, then trim | start from the full grid and *dig out* cells in one random order, keeping a removal only when the solution stays unique, until `target` clues remain |
| clue count | target uniform in the range, then repair/trim (the count drifts upward) | exactly `target`; board i has target `min + i % span` (the same number of boards at every clue count) |
| RNG stream | `dg-sudoku/v{GENERATOR_VERSION}/...` from the global `seed` | `dg-sudoku-independent/v{INDEPENDENT_VERSION}/...` from `data.independent.seed` |

A dig-out that gets stuck above its target (every remaining clue is needed for uniqueness) starts over with a new
grid and order from the same board RNG, so board i depends on (seed, size, clue range, i) alone.

`independent_boards` is called only by the evaluation side of `sources.load_splits` (`held_out_sets`); the
training-data builder receives nothing from here but the set of puzzles it must avoid.
"""

from __future__ import annotations

import functools
import random

from dg_pipeline.core.errors import InputError
from dg_pipeline.data.sudoku import Board, check_clue_range, find_solutions, geometry, to_string

# Bumped whenever this generator's output for a given seed changes.
INDEPENDENT_VERSION = 1
# Name of this source in eval Examples (meta["eval_source"]) and in the gate's per-source report.
SOURCE_NAME = "independent"
# Restarts of one board (new grid, new dig order) before giving up on its clue target.
MAX_RESTARTS = 10_000


@functools.lru_cache(maxsize=None)
def all_grids(size: int) -> tuple[tuple[int, ...], ...]:
    """Every complete grid of a board size small enough to enumerate (4x4: 288 grids)."""
    if size != 4:
        raise ValueError(f"enumerating every {size}x{size} grid is infeasible")
    return tuple(tuple(g) for g in find_solutions([0] * 16, 4, limit=1000))


def row_major_grid(size: int, rng: random.Random) -> list[int]:
    """A random complete grid filled cell by cell in row-major order, candidates in random order, with
    chronological backtracking (no most-constrained-cell choice, unlike the training generator)."""
    g = geometry(size)
    grid = [0] * g.cells
    rows, cols, boxes = [0] * size, [0] * size, [0] * size
    options: list[list[int]] = [[] for _ in range(g.cells)]
    cell = 0
    fresh = True  # `cell` is entered from the cell before it (draw its candidates) rather than backtracked into
    while cell < g.cells:
        r, c, b = g.units[cell]
        if fresh:
            used = rows[r] | cols[c] | boxes[b]
            options[cell] = [d for d in range(1, size + 1) if not used & (1 << (d - 1))]
            rng.shuffle(options[cell])
        elif grid[cell]:
            bit = 1 << (grid[cell] - 1)
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
            grid[cell] = 0
        if options[cell]:
            digit = options[cell].pop()
            bit = 1 << (digit - 1)
            grid[cell] = digit
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            cell, fresh = cell + 1, True
        else:
            cell, fresh = cell - 1, False
    return grid


def independent_grid(size: int, rng: random.Random) -> list[int]:
    if size == 4:
        return list(rng.choice(all_grids(4)))
    return row_major_grid(size, rng)


def dig_out_board(size: int, rng: random.Random, target_clues: int) -> Board | None:
    """Remove clues from a full grid in one random order while the solution stays unique; a board with exactly
    `target_clues` clues, or None when the dig got stuck above it."""
    g = geometry(size)
    solution = independent_grid(size, rng)
    puzzle = list(solution)
    clues = g.cells
    order = list(range(g.cells))
    rng.shuffle(order)
    for cell in order:
        if clues == target_clues:
            break
        digit = puzzle[cell]
        puzzle[cell] = 0
        if len(find_solutions(puzzle, size, limit=2)) == 1:
            clues -= 1
        else:
            puzzle[cell] = digit
    if clues != target_clues:
        return None
    return Board(to_string(puzzle), to_string(solution))


def independent_rng(seed: int, size: int, index: int) -> random.Random:
    return random.Random(f"dg-sudoku-independent/v{INDEPENDENT_VERSION}/size{size}/seed{seed}/board{index}")


def independent_boards(size: int, n: int, min_clues: int, max_clues: int, seed: int) -> list[Board]:
    """`n` distinct boards, board i with exactly min_clues + (i' mod span) clues (i' counts the distinct boards
    kept so far, so every clue count gets the same share); deterministic in (size, n, clue range, seed)."""
    check_clue_range(size, min_clues, max_clues)
    if n < 0:
        raise InputError(f"data.independent.n_eval={n}: must be >= 0")
    span = max_clues - min_clues + 1
    boards: list[Board] = []
    seen: set[str] = set()
    index = 0
    while len(boards) < n:
        target = min_clues + len(boards) % span
        rng = independent_rng(seed, size, index)
        index += 1
        board = None
        for _ in range(MAX_RESTARTS):
            board = dig_out_board(size, rng, target)
            if board is not None:
                break
        if board is None:
            raise InputError(
                f"the independent generator found no {size}x{size} board with {target} clues in {MAX_RESTARTS} "
                f"digs (fix: raise data.independent.min_clues)"
            )
        if board.puzzle not in seen:
            seen.add(board.puzzle)
            boards.append(board)
        if index > 20 * n + 1000:
            raise InputError(
                f"could not find {n} distinct independent {size}x{size} puzzles with {min_clues}..{max_clues} clues "
                f"(only {len(boards)}; fix: widen the clue range or lower data.independent.n_eval)"
            )
    return boards
