"""Benchmark: wall time to generate unique-solution Sudoku boards (100k 9x9 and 20k 4x4 by default).

    python -m bench.sudoku_generation [--workers 2] [--n9 100000] [--n4 20000]

Prints a table and writes bench/results/sudoku_generation.json. Also times reading the 9x9 boards back from JSONL
(what load_splits does when it reuses generated data: every row is validated).
"""

from __future__ import annotations

import argparse
import os
import resource
import platform
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dg_pipeline.core.io import atomic_write_json
from dg_pipeline.data.readers import read_boards_jsonl, write_boards_jsonl
from dg_pipeline.data.sudoku import generate_boards

RESULTS = Path(__file__).resolve().parent / "results" / "sudoku_generation.json"


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the generator's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_generation(size: int, n: int, min_clues: int, max_clues: int, seed: int, workers: int) -> tuple[dict, list]:
    started, cpu_started = time.perf_counter(), cpu_seconds()
    boards = generate_boards(size, n, min_clues, max_clues, seed, workers=workers, progress=True)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    clues = [sum(ch != "0" for ch in b.puzzle) for b in boards]
    row = {
        "what": f"generate {n:,} {size}x{size} boards",
        "size": size,
        "n": n,
        "clues": f"{min_clues}..{max_clues}",
        "mean_clues": round(statistics.fmean(clues), 2),
        "workers": workers,
        "seconds": round(seconds, 2),
        "boards_per_second": round(n / seconds, 1),
        # CPU time spent (all processes): the cost without the other jobs sharing the machine.
        "cpu_seconds": round(cpu, 2),
        "cpu_ms_per_board": round(1000 * cpu / n, 3),
    }
    return row, boards


def time_reading(boards: list, size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_boards_jsonl(Path(tmp) / "boards.jsonl", boards)
        started, cpu_started = time.perf_counter(), cpu_seconds()
        read_boards_jsonl(path, size)
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    return {
        "what": f"read + validate {len(boards):,} {size}x{size} boards (JSONL)",
        "size": size,
        "n": len(boards),
        "clues": "",
        "mean_clues": None,
        "workers": 1,
        "seconds": round(seconds, 2),
        "boards_per_second": round(len(boards) / seconds, 1),
        "cpu_seconds": round(cpu, 2),
        "cpu_ms_per_board": round(1000 * cpu / len(boards), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="generator processes")
    parser.add_argument("--n9", type=int, default=100_000, help="9x9 boards to generate")
    parser.add_argument("--n4", type=int, default=20_000, help="4x4 boards to generate")
    parser.add_argument("--clues9", type=int, nargs=2, default=(30, 45), metavar=("MIN", "MAX"))
    parser.add_argument("--clues4", type=int, nargs=2, default=(4, 10), metavar=("MIN", "MAX"))
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    rows = []
    row9, boards9 = time_generation(9, args.n9, *args.clues9, args.seed, args.workers)
    rows.append(row9)
    rows.append(time_reading(boards9, 9))
    row4, _ = time_generation(4, args.n4, *args.clues4, args.seed, args.workers)
    rows.append(row4)

    machine = f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})"
    table = Table(title=f"Sudoku generation - {machine}")
    for col in ("what", "clues", "mean clues", "workers", "wall s", "boards/s", "CPU s", "CPU ms/board"):
        table.add_column(col, justify="left" if col == "what" else "right")
    for r in rows:
        table.add_row(r["what"], r["clues"], str(r["mean_clues"] or ""), str(r["workers"]), f"{r['seconds']:.2f}",
                      f"{r['boards_per_second']:,.0f}", f"{r['cpu_seconds']:.1f}", f"{r['cpu_ms_per_board']:.3f}")
    Console(width=130).print(table)
    load = os.getloadavg()[0]  # other jobs on the machine stretch the wall times; the CPU columns do not move
    print(f"1-minute load average at the end: {load:.1f} on {os.cpu_count()} cores")
    atomic_write_json(args.out, {"machine": machine, "python": platform.python_version(), "load_average_1m": load,
                                 "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
