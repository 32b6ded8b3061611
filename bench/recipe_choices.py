"""Benchmark: the sudoku4 recipe choices, each trained from the same base and scored on both 4x4 board sources.

    python -m bench.recipe_choices [--only NAME ...] [--steps N] [--seeds S ...] [--run-dir runs/recipe-choices]
                                   [--threads N]

Each choice is a set of Hydra overrides on the default recipe; for each one this runs stage=base and stage=sft (its
gate, with the sampler settings the recipe writes) into <run-dir>/<choice>/ and reads sft/verify.json. The table: training
time, solve rate on the training generator's eval split (`pipeline`) and on the independent generator's boards
(`independent`), the same at exactly 3 denoising steps, steps per block and tokens per forward. `--steps` runs every
choice at that many optimiser steps (a proxy screen; the warm-up scales with it); the default is each choice's own.
`--seeds` trains each choice once per seed (the global `seed`: data order, noise and init of the run) and adds a
median row per choice: one run of a choice moves by up to ~20 points from seed to seed, so compare medians.
Prints a table and writes bench/results/recipe_choices.json. Timings move with other jobs on a shared CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from dg_pipeline.core.io import atomic_write_json, read_json
from dg_pipeline.settings import compose
from dg_pipeline.verify.speed import spread

RESULTS = Path(__file__).resolve().parent / "results" / "recipe_choices.json"
console = Console(width=160)

# The gate of every choice: no AR baseline or batch-1 speed pass (not compared here), a fixed-3-step sweep point.
GATE = ["verify.ar_baseline=false", "verify.speed_examples=1", "verify.sweep_steps=[3]", "verify.sweep_examples=150",
        "verify.plots=false"]
# The previous default recipe (before issue 13), as overrides on today's.
OLD = ["trainer.max_steps=1500", "trainer.batch_size=16", "trainer.lr=5e-3", "trainer.warmup_steps=50",
       "data.n_train=20000", "data.min_clues=4", "data.max_clues=10", "objective.ar_loss_scope=response",
       "objective.t_eps=0.001", "objective.fill_token=pad", "verify.choose_steps=false"]
# Measured choices (name -> overrides on today's default recipe); the default recipe itself is `default`.
# (`old` runs today's generator, which hits each board's drawn clue count; see data/sudoku.py.)
WEIGHTS = ["data.clue_weights=[2,2,1.5,1.5,1,1,1]"]
CHOICES: dict[str, list[str]] = {
    "old": OLD,
    "old+lr=1e-2": OLD + ["trainer.lr=1e-2"],
    "old+low-clue-weights": OLD + WEIGHTS,
    # Issue 13, first pass (measured at 2200 steps).
    "objective-before": ["trainer.max_steps=2200", "objective.ar_loss_scope=response", "objective.t_eps=0.001"],
    "objective-before+low-clue-weights": ["trainer.max_steps=2200", "objective.ar_loss_scope=response",
                                          "objective.t_eps=0.001", *WEIGHTS],
    "t_eps=0.001": ["trainer.max_steps=2200", "objective.t_eps=0.001"],
    "t_eps=0.001+ema": ["trainer.max_steps=2200", "objective.t_eps=0.001", "trainer.ema.enable=true",
                        "trainer.ema.decay=0.995"],
    # Second pass (run with --seeds: one run moves by up to ~20 points).
    "t_eps=0.3": ["objective.t_eps=0.3"],
    "ema": ["trainer.ema.enable=true", "trainer.ema.decay=0.995"],
    "lr=3e-3": ["trainer.lr=3e-3"],
    "lr=8e-3": ["trainer.lr=8e-3"],
    "batch=32+steps=1200": ["trainer.batch_size=32", "trainer.max_steps=1200"],  # the time of 1800 steps at 16
    "low-clue-weights": ["data.clue_weights=[2,1.5,1,1,1,1,1]"],
    "steps=2400": ["trainer.max_steps=2400"],
    "steps=3600": ["trainer.max_steps=3600"],
    # The base is a random init, so is its MoE router; the DiffusionGemma recipe freezes it (right for the released
    # model's trained router).
    "trained-router": ["objective.freeze_router=false"],
    "trained-router+steps=2400": ["objective.freeze_router=false", "trainer.max_steps=2400"],
    # Third pass (stop 19).
    "ar_loss_weight=0.5": ["objective.ar_loss_weight=0.5"],
    "min_lr_ratio=0": ["trainer.min_lr_ratio=0.0"],
    "min_lr_ratio=0.5": ["trainer.min_lr_ratio=0.5"],
    "batch=8+steps=2700": ["trainer.batch_size=8", "trainer.max_steps=2700"],  # ~1.05x the time of 1800 steps at 16
    "batch=4+steps=3400": ["trainer.batch_size=4", "trainer.max_steps=3400"],  # ~1.0x
    "default": [],
}


def run_choice(name: str, overrides: list[str], run_dir: Path, steps: int | None, seed: int | None) -> dict:
    from dg_pipeline.stages import base as base_stage
    from dg_pipeline.stages import sft as sft_stage

    extra = [f"trainer.max_steps={steps}", f"trainer.warmup_steps={max(1, steps // 30)}"] if steps else []
    extra += [f"seed={seed}"] if seed is not None else []
    cfg = compose([f"run_dir={run_dir}", "force=true", "device=cpu", "logger=none", "trainer.progress_bar=none",
                   *GATE, *overrides, *extra])
    base_stage.run(cfg)
    started = time.perf_counter()
    record = sft_stage.run(cfg)
    training = read_json(run_dir / "sft" / "training.json")
    fixed3 = next((p for p in record["sweep"] if p["max_denoising_steps"] == 3), None)
    return {
        "choice": name,
        "seed": seed,
        "overrides": overrides + extra,
        "steps": training["steps"],
        "train_seconds": training["wall_seconds"],
        "stage_seconds": time.perf_counter() - started,
        "solved": {s: c["accuracy"] for s, c in record["by_source"].items()},
        "solved_by_clues": {s: {k: c["accuracy"] for k, c in v.items()}
                            for s, v in record["by_stratum"]["clues"].items()},
        "solved_fixed3": fixed3["by_source"] if fixed3 else None,
        "max_denoising_steps": record["sampler"]["max_denoising_steps"],
        "mean_denoising_steps": record["mean_denoising_steps"],
        "tokens_per_forward": record["tokens_per_forward"],
    }


def run_dir_of(root: Path, name: str, seed: int | None) -> Path:
    folder = name.replace("=", "-").replace("+", "_")
    return root / (folder if seed is None else f"{folder}_seed{seed}")


def medians(rows: list[dict]) -> list[dict]:
    """Per choice: the median, min and max over its seeds of the solve rates and the steps per block."""
    out = []
    for choice in dict.fromkeys(r["choice"] for r in rows):
        runs = [r for r in rows if r["choice"] == choice]
        solved = {source: spread([r["solved"].get(source, 0.0) for r in runs]) for source in ("pipeline", "independent")}
        out.append({"choice": choice, "runs": len(runs), **solved,
                    "mean_denoising_steps": spread([r["mean_denoising_steps"] for r in runs])})
    return out


def spread_text(s: dict, digits: int = 3) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help=f"choices to run (default all: {', '.join(CHOICES)})")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps for every choice (proxy screen)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="train each choice once per seed and report the median (default: the recipe's seed)")
    parser.add_argument("--run-dir", default="runs/recipe-choices")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "offline")
    unknown = sorted(set(args.only or []) - set(CHOICES))
    if unknown:
        parser.error(f"unknown choice(s) {unknown}; known: {', '.join(CHOICES)}")
    seeds = args.seeds or [None]
    rows = [run_choice(name, CHOICES[name], run_dir_of(Path(args.run_dir).resolve(), name, seed), args.steps, seed)
            for name in (args.only or CHOICES) for seed in seeds]

    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads ({os.cpu_count()} cores visible)"
    table = Table(title=f"sudoku4 recipe choices ({machine})")
    for column in ("choice", "seed", "steps", "train s", "pipeline", "independent", "pipeline @3", "indep. @3",
                   "max steps", "steps/blk", "tok/fwd"):
        table.add_column(column, justify="left" if column == "choice" else "right")
    for r in rows:
        f3 = r["solved_fixed3"] or {}
        table.add_row(r["choice"], "recipe" if r["seed"] is None else str(r["seed"]), str(r["steps"]),
                      f"{r['train_seconds']:.0f}", f"{r['solved'].get('pipeline', 0):.3f}",
                      f"{r['solved'].get('independent', 0):.3f}", f"{f3.get('pipeline', 0):.3f}",
                      f"{f3.get('independent', 0):.3f}", str(r["max_denoising_steps"]),
                      f"{r['mean_denoising_steps']:.2f}", f"{r['tokens_per_forward']:.2f}")
    summary = medians(rows) if len(seeds) > 1 else []
    for m in summary:
        table.add_row(f"[bold]{m['choice']}[/]", f"median of {m['runs']}", "", "",
                      spread_text(m["pipeline"]), spread_text(m["independent"]), "", "", "",
                      spread_text(m["mean_denoising_steps"], 2), "")
    console.print(table)
    atomic_write_json(RESULTS, {"benchmark": "recipe_choices", "machine": machine, "rows": rows, "medians": summary})
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
