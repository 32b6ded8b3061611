"""Sudoku boards: geometry, a bitmask backtracking solver, a unique-solution generator and a board validator.

Board strings are row-major digits, `0` = blank, `size*size` characters (16 for 4x4, 81 for 9x9).

Generation (per board): draw a clue-count `target` (uniform over the range, or `clue_weights`), fill a random
complete grid, keep a random subset of `target` cells as clues, then *repair* until the solution is unique (find a
second solution, add as a clue one cell where it disagrees with ours) and *trim* back toward `target` (drop a clue if
the board stays unique). An attempt that lands above `target` is retried (up to EXACT_TARGET_TRIES times, then any
count in range is kept): repair overshoots most at the floor (4x4 target 4 lands on 5 about 40% of the time), so
without the retries the fewest-clue boards, the hardest ones, would be the rarest. Each board costs a handful of
solver calls. Board i of the stream has its own RNG seeded by (seed, size, i), so the output depends on the seed,
the clue range and weights only, never on the number of worker processes.

Clue-count limits (checked by `check_clue_range`, an InputError otherwise):
- 4x4: >= 4 clues (no 4x4 board with 3 or fewer clues has a unique solution), <= 15 (at least one blank).
- 9x9: >= 22 clues. 17 is the proven minimum, but random boards with fewer than ~22 unique-solution clues are so
  rare that generation would effectively never finish; <= 80.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import operator
import os
import random
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Sequence

from dg_pipeline.core.errors import InputError

# Smallest clue count a generated board may have, per size (see the module docstring for why).
MIN_GENERATED_CLUES = {4: 4, 9: 22}
# Most boards handed to a worker process at once.
CHUNK_SIZE = 100
# Bumped whenever the generator's output for a given seed changes (cached data files are regenerated).
GENERATOR_VERSION = 3
# Attempts at a board with exactly its drawn clue count before one with more clues (still in range) is kept.
EXACT_TARGET_TRIES = 20


class Board(NamedTuple):
    puzzle: str
    solution: str


# --------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """Row/column/box index of every cell of a size x size board (box = sqrt(size))."""

    size: int
    box: int
    row_of: tuple[int, ...]
    col_of: tuple[int, ...]
    box_of: tuple[int, ...]
    units: tuple[tuple[int, int, int], ...]  # (row, col, box) of each cell
    full_mask: int  # one bit per digit
    unit_getters: tuple[Callable, ...]  # one itemgetter per row, column and box: the cells of a board string

    @property
    def cells(self) -> int:
        return self.size * self.size

    def where(self, cell: int) -> str:
        return f"row {self.row_of[cell] + 1} col {self.col_of[cell] + 1}"

    def box_name(self, b: int) -> str:
        r0, c0 = (b // self.box) * self.box, (b % self.box) * self.box
        return f"box {b + 1} (rows {r0 + 1}-{r0 + self.box}, cols {c0 + 1}-{c0 + self.box})"


@functools.lru_cache(maxsize=None)
def geometry(size: int) -> Geometry:
    box = math.isqrt(size)
    if size not in MIN_GENERATED_CLUES:
        raise InputError(f"data.size={size}: unsupported board size (fix: use 4 for 4x4 or 9 for 9x9)")
    cells = range(size * size)
    row_of = tuple(c // size for c in cells)
    col_of = tuple(c % size for c in cells)
    box_of = tuple((r // box) * box + c // box for r, c in zip(row_of, col_of))
    unit_cells = [[c for c in cells if of[c] == u] for of in (row_of, col_of, box_of) for u in range(size)]
    getters = tuple(operator.itemgetter(*unit) for unit in unit_cells)
    return Geometry(size, box, row_of, col_of, box_of, tuple(zip(row_of, col_of, box_of)), (1 << size) - 1, getters)


def size_for_length(length: int) -> int | None:
    """The board size whose strings have `length` characters (16 -> 4, 81 -> 9), else None."""
    return next((s for s in MIN_GENERATED_CLUES if s * s == length), None)


def to_cells(board: str) -> list[int]:
    return [int(ch) for ch in board]


def to_string(cells: Sequence[int]) -> str:
    return "".join(map(str, cells))


# --------------------------------------------------------------------------------------------- solver


def find_solutions(
    cells: Sequence[int], size: int, limit: int = 2, rng: random.Random | None = None
) -> list[list[int]]:
    """Up to `limit` complete solutions of a board (0 = blank); [] when its clues conflict or it has none.

    Bitmask backtracking that always branches on the blank with the fewest candidates. With `rng`, candidate
    digits are tried in random order (used to fill random complete grids).
    """
    g = geometry(size)
    grid = list(cells)
    rows, cols, boxes = [0] * size, [0] * size, [0] * size
    empties = []
    for cell, digit in enumerate(grid):
        if digit == 0:
            empties.append(cell)
            continue
        bit = 1 << (digit - 1)
        r, c, b = g.units[cell]
        if (rows[r] | cols[c] | boxes[b]) & bit:
            return []  # two equal clues share a unit
        rows[r] |= bit
        cols[c] |= bit
        boxes[b] |= bit
    found: list[list[int]] = []
    _search(grid, rows, cols, boxes, empties, g.units, g.full_mask, limit, found, rng)
    return found


def _search(grid, rows, cols, boxes, empties, units, full, limit, found, rng) -> None:
    if not empties:
        found.append(grid.copy())
        return
    best_i, best_mask, best_n = 0, 0, 99
    for i, cell in enumerate(empties):
        r, c, b = units[cell]
        mask = full & ~(rows[r] | cols[c] | boxes[b])
        n = mask.bit_count()
        if n < best_n:
            best_i, best_mask, best_n = i, mask, n
            if n <= 1:
                break  # a dead end or a forced digit: no better choice exists
    if best_n == 0:
        return
    cell = empties[best_i]
    empties[best_i] = empties[-1]
    empties.pop()
    r, c, b = units[cell]
    bits = []
    while best_mask:
        bit = best_mask & -best_mask
        bits.append(bit)
        best_mask ^= bit
    if rng is not None and len(bits) > 1:
        rng.shuffle(bits)
    for bit in bits:
        grid[cell] = bit.bit_length()
        rows[r] |= bit
        cols[c] |= bit
        boxes[b] |= bit
        _search(grid, rows, cols, boxes, empties, units, full, limit, found, rng)
        rows[r] ^= bit
        cols[c] ^= bit
        boxes[b] ^= bit
        if len(found) >= limit:
            break
    grid[cell] = 0
    empties.append(cell)
    empties[best_i], empties[-1] = empties[-1], empties[best_i]


def count_solutions(puzzle: str, limit: int = 2) -> int:
    """How many solutions a board string has, counting no further than `limit`."""
    size = size_for_length(len(puzzle))
    if size is None:
        raise InputError(f"board has {len(puzzle)} characters; expected 16 (4x4) or 81 (9x9)")
    return len(find_solutions(to_cells(puzzle.replace(".", "0")), size, limit))


def random_solution(size: int, rng: random.Random) -> list[int]:
    """A random complete grid: random digits in the diagonal boxes, then randomised backtracking for the rest."""
    g = geometry(size)
    while True:
        grid = [0] * g.cells
        # Diagonal boxes share no row, column or box, so any digit order in each is consistent; it spares the
        # solver its most expensive part (choosing among 81 wide-open cells).
        for k in range(g.box):
            digits = rng.sample(range(1, size + 1), size)
            for i, digit in enumerate(digits):
                grid[(k * g.box + i // g.box) * size + k * g.box + i % g.box] = digit
        found = find_solutions(grid, size, limit=1, rng=rng)
        if found:
            return found[0]


# --------------------------------------------------------------------------------------------- generator


def check_clue_range(size: int, min_clues: int, max_clues: int) -> None:
    """Raise InputError when boards of `size` with min_clues..max_clues unique-solution clues cannot be made."""
    g = geometry(size)
    floor = MIN_GENERATED_CLUES[size]
    for key, value in (("data.min_clues", min_clues), ("data.max_clues", max_clues)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{key}={value!r}: must be an integer number of clues (fix: e.g. {key}={floor})")
    if min_clues < floor:
        why = (
            "no 4x4 board with fewer than 4 clues has a unique solution"
            if size == 4
            else "unique 9x9 boards with fewer than ~22 clues are too rare to generate at random "
            "(17 is the proven minimum)"
        )
        raise InputError(f"data.min_clues={min_clues}: {why} (fix: data.min_clues>={floor} for size {size})")
    if max_clues > g.cells - 1:
        raise InputError(
            f"data.max_clues={max_clues}: a {size}x{size} board has {g.cells} cells and needs at least one blank "
            f"(fix: data.max_clues<={g.cells - 1})"
        )
    if min_clues > max_clues:
        raise InputError(f"data.min_clues={min_clues} > data.max_clues={max_clues} (fix: make min_clues <= max_clues)")


def make_board(size: int, rng: random.Random, target_clues: int, max_clues: int) -> Board | None:
    """One board with a unique solution and target_clues..max_clues clues, or None if even a full trim overshot."""
    g = geometry(size)
    solution = random_solution(size, rng)
    order = list(range(g.cells))
    rng.shuffle(order)
    puzzle = [0] * g.cells
    for cell in order[:target_clues]:
        puzzle[cell] = solution[cell]
    _repair_until_unique(puzzle, solution, size, rng)
    # A few tries per excess clue gets near the target; only past max_clues is every clue worth a solver call.
    _trim_toward(puzzle, target_clues, size, rng, tries_per_excess_clue=3)
    _trim_toward(puzzle, max_clues, size, rng, tries_per_excess_clue=g.cells)
    if g.cells - puzzle.count(0) > max_clues:
        return None
    return Board(to_string(puzzle), to_string(solution))


def _repair_until_unique(puzzle: list[int], solution: list[int], size: int, rng: random.Random) -> None:
    """Add clues from `solution` until it is the board's only solution."""
    while True:
        other = next((s for s in find_solutions(puzzle, size, limit=2) if s != solution), None)
        if other is None:
            return
        disagreements = [cell for cell, (a, b) in enumerate(zip(other, solution)) if a != b]
        cell = rng.choice(disagreements)
        puzzle[cell] = solution[cell]


def _trim_toward(
    puzzle: list[int], target_clues: int, size: int, rng: random.Random, tries_per_excess_clue: int
) -> None:
    """Drop clues (random order) while above `target_clues`, keeping only drops that leave the solution unique."""
    clue_cells = [cell for cell, d in enumerate(puzzle) if d]
    excess = len(clue_cells) - target_clues
    if excess <= 0:
        return
    rng.shuffle(clue_cells)
    for cell in clue_cells[: tries_per_excess_clue * excess + 4]:
        digit = puzzle[cell]
        puzzle[cell] = 0
        if len(find_solutions(puzzle, size, limit=2)) != 1:
            puzzle[cell] = digit
            continue
        excess -= 1
        if excess == 0:
            return


def board_rng(seed: int, size: int, index: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: stable across runs and processes.
    return random.Random(f"dg-sudoku/v{GENERATOR_VERSION}/size{size}/seed{seed}/board{index}")


def check_clue_weights(min_clues: int, max_clues: int, clue_weights: Sequence[float] | None) -> None:
    """Raise InputError unless `clue_weights` is None or one non-negative weight per clue count, not all zero."""
    if clue_weights is None:
        return
    span = max_clues - min_clues + 1
    weights = list(clue_weights)
    if len(weights) != span or any(isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in weights) \
            or not sum(weights) > 0:
        raise InputError(
            f"data.clue_weights={weights}: expected {span} non-negative numbers, one per clue count "
            f"{min_clues}..{max_clues}, not all zero (fix: e.g. data.clue_weights=[{', '.join(['1'] * span)}], "
            "or null for uniform)"
        )


def generate_range(
    size: int, min_clues: int, max_clues: int, seed: int, start: int, stop: int,
    clue_weights: Sequence[float] | None = None,
) -> list[Board]:
    """Boards `start`..`stop-1` of the stream for (size, clue range and weights, seed); board i depends on i alone."""
    counts = range(min_clues, max_clues + 1)
    boards = []
    for index in range(start, stop):
        rng = board_rng(seed, size, index)
        target = rng.choices(counts, weights=clue_weights)[0] if clue_weights else rng.randint(min_clues, max_clues)
        board, tries = None, 0
        # Retries reuse the board's RNG stream: still deterministic.
        while board is None or (tries < EXACT_TARGET_TRIES and clue_count(board.puzzle) != target):
            board = make_board(size, rng, target, max_clues)
            tries += 1
        boards.append(board)
    return boards


def clue_count(puzzle: str) -> int:
    return sum(ch != "0" for ch in puzzle)


def _generate_range_star(args: tuple) -> list[Board]:
    return generate_range(*args)


def generate_boards(
    size: int,
    n: int,
    min_clues: int,
    max_clues: int,
    seed: int,
    workers: int | None = 1,
    exclude: Iterable[str] = (),
    progress: bool = False,
    clue_weights: Sequence[float] | None = None,
) -> list[Board]:
    """`n` boards with distinct puzzles (none in `exclude`), each with a unique solution and clues in range;
    `clue_weights` (one per count min..max; None = uniform) is how often each count is drawn.

    The result is the first `n` new puzzles of the seeded board stream, so it is the same for any `workers`
    (None = all CPU cores), and a longer request extends a shorter one.
    """
    check_clue_range(size, min_clues, max_clues)
    check_clue_weights(min_clues, max_clues, clue_weights)
    weights = tuple(float(w) for w in clue_weights) if clue_weights is not None else None
    if n < 0:
        raise InputError(f"number of boards must be >= 0, got {n}")
    workers = _resolve_workers(workers)
    seen = set(exclude)
    boards: list[Board] = []
    next_index = 0
    # The pool forks before the progress bar starts its refresh thread.
    with _pool(workers) as pool, _Progress(progress, f"generating {n:,} {size}x{size} boards", n) as bar:
        while len(boards) < n:
            # The boards still missing (+1% to absorb duplicates), in tasks small enough to keep every worker busy.
            want = n - len(boards) + (n - len(boards)) // 100 + 1
            step = max(1, min(CHUNK_SIZE, math.ceil(want / workers)))
            tasks = [(size, min_clues, max_clues, seed, i, min(i + step, next_index + want), weights)
                     for i in range(next_index, next_index + want, step)]
            next_index += want
            results = pool.imap(_generate_range_star, tasks) if pool else map(_generate_range_star, tasks)
            for chunk in results:
                for board in chunk:
                    if len(boards) < n and board.puzzle not in seen:
                        seen.add(board.puzzle)
                        boards.append(board)
                bar.advance(len(boards) - bar.completed)
                if len(boards) >= n:
                    break
            if next_index > 20 * n + 10_000:
                raise InputError(
                    f"could not find {n} distinct {size}x{size} puzzles with {min_clues}..{max_clues} clues "
                    f"(only {len(boards)}; fix: widen data.min_clues..data.max_clues or ask for fewer boards)"
                )
    return boards


def _resolve_workers(workers: int | None) -> int:
    if workers is None or workers == 0:
        # The cores this process may run on (a container or taskset can allow fewer than the machine has).
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if workers < 0:
        raise InputError(f"data.workers={workers}: must be >= 1, or null for all CPU cores")
    return int(workers)


class _pool:
    """A process pool for workers > 1 (fork where available: workers need nothing but this module), else None."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None

    def __enter__(self):
        if self.workers > 1:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self.pool = ctx.Pool(self.workers)
        return self.pool

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


class _Progress:
    """A rich progress bar for long generations (a no-op when disabled)."""

    def __init__(self, enabled: bool, description: str, total: int):
        self.enabled, self.description, self.total = enabled, description, total
        self.completed = 0
        self._progress = None

    def __enter__(self):
        if self.enabled:
            from dg_pipeline.core.progress import progress_bar

            self._progress = progress_bar(remaining=True)
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total)
        return self

    def advance(self, k: int) -> None:
        self.completed += k
        if self._progress is not None and k:
            self._progress.advance(self._task, k)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()


# --------------------------------------------------------------------------------------------- validator


class BoardError(InputError):
    """A bad puzzle/solution pair. `problem` says what and where on the board; `fix` how to repair it."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem} (fix: {fix})")
        self.problem, self.fix = problem, fix


def normalize_puzzle(puzzle: str) -> str:
    """'.' is a blank too (Kaggle-style dumps); the canonical blank is '0'."""
    return puzzle.strip().replace(".", "0")


def validate_board(puzzle: str, solution: str, size: int | None = None) -> Board:
    """Check a puzzle/solution pair and return it normalised ('.' -> '0'); raise BoardError naming the fault.

    Checks, in order: lengths, characters, the solution is a complete valid grid (each digit once per row,
    column and box), and the solution keeps every clue of the puzzle.
    """
    puzzle, solution = normalize_puzzle(puzzle), solution.strip()
    size = _board_size(puzzle, solution, size)
    g = geometry(size)
    _check_characters("puzzle", puzzle, g, blanks_allowed=True)
    _check_characters("solution", solution, g, blanks_allowed=False)
    _check_complete_grid(solution, g)
    for cell, (clue, answer) in enumerate(zip(puzzle, solution)):
        if clue != "0" and clue != answer:
            raise BoardError(
                f"solution contradicts clue at {g.where(cell)}: the puzzle has {clue}, the solution {answer}",
                "the solution must keep every clue of its puzzle; check that the two columns belong together",
            )
    return Board(puzzle, solution)


def _board_size(puzzle: str, solution: str, size: int | None) -> int:
    if size is None:
        size = size_for_length(len(puzzle))
        if size is None:
            raise BoardError(
                f"puzzle has {len(puzzle)} characters",
                "a board is 16 (4x4) or 81 (9x9) digits, row by row, 0 or . for a blank",
            )
    n = size * size
    for name, board in (("puzzle", puzzle), ("solution", solution)):
        if len(board) != n:
            raise BoardError(
                f"{name} has {len(board)} characters, expected {n} for a {size}x{size} board",
                f"write {n} digits row by row (0 or . = blank), or set data.size to the board size of the file",
            )
    return size


def _check_characters(name: str, board: str, g: Geometry, blanks_allowed: bool) -> None:
    allowed = set("123456789"[: g.size]) | ({"0"} if blanks_allowed else set())
    if set(board) <= allowed:
        return
    for cell, ch in enumerate(board):
        if ch in allowed:
            continue
        if ch == "0":
            raise BoardError(f"{name} has a blank at {g.where(cell)}", "a solution must be complete: no 0 or .")
        what = f"digit {ch!r}" if ch.isdigit() else f"non-digit character {ch!r}"
        fix = f"use digits 1-{g.size}" + (", and 0 or . for a blank" if blanks_allowed else "")
        raise BoardError(f"{name} has {what} at {g.where(cell)}", fix)


def _check_complete_grid(solution: str, g: Geometry) -> None:
    if all(len(set(cells_of(solution))) == g.size for cells_of in g.unit_getters):
        return  # the common case; the loop below finds and names the first repeat
    cells = to_cells(solution)
    units = (("row", g.row_of), ("col", g.col_of), ("box", g.box_of))
    for kind, unit_of in units:
        first_at: dict[tuple[int, int], int] = {}
        for cell, digit in enumerate(cells):
            key = (unit_of[cell], digit)
            if key not in first_at:
                first_at[key] = cell
                continue
            unit = g.box_name(unit_of[cell]) if kind == "box" else f"{kind} {unit_of[cell] + 1}"
            raise BoardError(
                f"solution repeats {digit} in {unit} (at {g.where(first_at[key])} and {g.where(cell)})",
                "a solution has each digit exactly once in every row, column and box",
            )
