"""Benchmark: 9x9 Sudoku learned on a CPU under a fixed training budget, scored on both 9x9 board sources.

    python -m bench.sudoku9_cpu [--minutes 30] [--n-eval 100] [--run-dir runs/bench-sudoku9-cpu] [--threads N]

The pipeline's own stages (base, then sft with its gate) on the sudoku9 data with a model sized for 2 cores
(`model=sudoku9_cpu`, `trainer=cpu`); the sudoku9 GPU recipe is untouched. The budget is turned into a step count
before training (so the cosine schedule ends where the budget does): a few timed training steps of the same model
and batch give the step time, and max_steps = budget / step time. Reports the solve rate on the training generator's
eval split (`pipeline`) and on the independent generator's boards (`independent`), diffusion and AR, the mean
denoising steps per block and tokens per forward, and the fixed-step sweep. Prints a table and writes
bench/results/sudoku9_cpu.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from dg_pipeline.core.io import atomic_write_json, read_json
from dg_pipeline.settings import compose

RESULTS = Path(__file__).resolve().parent / "results" / "sudoku9_cpu.json"
console = Console(width=140)


def measure_step_seconds(cfg, steps: int = 6, warmup: int = 2) -> float:
    """Median wall time of one training step (the sft objective, batch trainer.batch_size) of cfg's model."""
    from dg_pipeline.data import build_board_tokenizer, collate, generate_boards, sudoku_examples
    from dg_pipeline.model import build_model
    from dg_pipeline.objective import build_objective
    from dg_pipeline.training.module import freeze_router, freeze_vision

    from bench.step_time import time_steps

    tokenizer = build_board_tokenizer()
    model = build_model(str(cfg.model.init), tokenizer, int(cfg.model.canvas_length), seed=0).train()
    freeze_router(model)
    freeze_vision(model)
    boards = generate_boards(9, int(cfg.trainer.batch_size), int(cfg.data.min_clues), int(cfg.data.max_clues), seed=0)
    batch = collate(sudoku_examples(boards, tokenizer), int(cfg.model.canvas_length), tokenizer.pad_token_id)
    objective = build_objective(cfg.objective, tokenizer)
    return statistics.median(time_steps(model, objective, batch, steps, warmup))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget (wall minutes)")
    parser.add_argument("--n-eval", type=int, default=100, help="boards per source (eval split, independent set)")
    parser.add_argument("--run-dir", default="runs/bench-sudoku9-cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides, e.g. trainer.lr=3e-3")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "offline")

    from dg_pipeline.stages import base as base_stage
    from dg_pipeline.stages import sft as sft_stage

    run_dir = Path(args.run_dir).resolve()
    overrides = [
        "recipe=sudoku9", "model=sudoku9_cpu", "trainer=cpu", "device=cpu", "logger=none", f"run_dir={run_dir}",
        "force=true", "trainer.progress_bar=none", "data.n_val=64", f"data.n_eval={args.n_eval}",
        "verify.speed_examples=4", "verify.sweep_steps=[2,4,8,16]", f"verify.sweep_examples={min(args.n_eval, 50)}",
        *args.overrides,
    ]
    cfg = compose(overrides)
    step_s = measure_step_seconds(cfg)
    budget_s = 60.0 * args.minutes
    max_steps = max(10, int(budget_s / step_s))
    # Every example seen about once: more boards than steps x batch (generation is ~1.3 ms a board at 30..45 clues).
    n_train = int(max_steps * int(cfg.trainer.batch_size) * 1.05) + 1000
    cfg = compose(overrides + [f"trainer.max_steps={max_steps}", f"data.n_train={n_train}",
                               f"trainer.val_check_interval={max(max_steps // 4, 1)}"])
    console.print(f"sudoku9_cpu: step {step_s * 1000:.0f} ms -> {max_steps} steps for {args.minutes:g} min; "
                  f"{n_train} training boards; run dir {run_dir}")

    started = time.perf_counter()
    base_stage.run(cfg)
    record = sft_stage.run(cfg)
    total_s = time.perf_counter() - started
    training = read_json(run_dir / "sft" / "training.json")

    by_source = record["by_source"]
    result = {
        "benchmark": "sudoku9_cpu",
        "budget_minutes": args.minutes,
        "measured_step_ms": 1000 * step_s,
        "max_steps": max_steps,
        "train_boards": training["train_examples"],
        "train_seconds": training["wall_seconds"],
        "stage_seconds": total_s,
        "model": str(cfg.model.init),
        "canvas_length": int(cfg.model.canvas_length),
        "clue_range": [int(cfg.data.min_clues), int(cfg.data.max_clues)],
        "solved": {s: c["accuracy"] for s, c in by_source.items()},
        "ar_solved": {s: c["ar_accuracy"] for s, c in by_source.items()},
        "n": {s: c["n"] for s, c in by_source.items()},
        "cell_accuracy": record.get("cell_accuracy"),
        "mean_denoising_steps": record["mean_denoising_steps"],
        "tokens_per_forward": record["tokens_per_forward"],
        "sampler": record["sampler"],
        "step_choice": record.get("step_choice"),
        "sweep": record["sweep"],
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads ({os.cpu_count()} cores visible)",
        "overrides": overrides,
    }
    table = Table(title=f"9x9 Sudoku on CPU: {max_steps} steps in {training['wall_seconds'] / 60:.1f} min "
                        f"(budget {args.minutes:g} min), model {cfg.model.init}; {result['machine']}")
    for column in ("source", "boards", "solved (diffusion)", "solved (AR)", "steps/block", "tokens/forward"):
        table.add_column(column, justify="left" if column == "source" else "right")
    for source, cell in by_source.items():
        table.add_row(source, str(cell["n"]), f"{cell['accuracy']:.3f}", f"{cell['ar_accuracy']:.3f}",
                      f"{record['mean_denoising_steps']:.2f}", f"{record['tokens_per_forward']:.2f}")
    console.print(table)
    if record["sweep"]:
        console.print("fixed steps: " + ", ".join(
            f"{p['max_denoising_steps']}: " + " / ".join(f"{a:.3f}" for a in p["by_source"].values())
            for p in record["sweep"]) + f"  ({' / '.join(by_source)})")
    atomic_write_json(RESULTS, result)
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
