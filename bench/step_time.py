"""Benchmark: time of one SFT training step (uniform objective, the full DiffusionGemma recipe) vs an AR-only step
(the encoder causal-LM loss alone), on the same model and batch.

    python -m bench.step_time [--shape sudoku4] [--canvas 32] [--batch 32] [--steps 10] [--threads N]

A step = objective loss (forward passes) + backward + AdamW step, router frozen as in training. Rows:
- `sft (uniform, full recipe)`: encoder pass over the clean sequence + AR loss, one noised block per example,
  self-conditioning with probability 0.5 per example (pass 1 without gradients, then pass 2);
- `sft, no self-conditioning`: the same with objective.self_conditioning_prob=0 (one decoder pass): what
  self-conditioning costs;
- `ar-only (encoder loss)`: the pretrain stage's step.
The ratio column is step time / the AR-only step time. Prints a table and writes bench/results/step_time.json.
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

from dg_pipeline.core.io import atomic_write_json
from dg_pipeline.data import build_board_tokenizer, collate, generate_boards, sudoku_examples
from dg_pipeline.model import build_model
from dg_pipeline.objective import EncoderARObjective, NoiseKey, UniformObjective
from dg_pipeline.training.module import freeze_router, freeze_vision, parameter_groups

RESULTS = Path(__file__).resolve().parent / "results" / "step_time.json"
console = Console(width=120)


def time_steps(model, objective, batch, steps: int, warmup: int = 2) -> list[float]:
    """Wall seconds of `steps` full training steps (after `warmup` untimed ones)."""
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-4), lr=1e-4, betas=(0.95, 0.99))
    noise = NoiseKey(0)
    times = []
    for i in range(warmup + steps):
        started = time.perf_counter()
        objective.loss(model, batch, noise).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="sudoku4", help="named model shape (dg_pipeline/model/configs.py)")
    parser.add_argument("--canvas", type=int, default=32, help="canvas length (conf/model/sudoku4.yaml: 32)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = build_board_tokenizer()
    model = build_model(args.shape, tokenizer, args.canvas, seed=0).train()
    freeze_router(model)
    freeze_vision(model)
    boards = generate_boards(4, args.batch, 4, 10, seed=0)
    batch = collate(sudoku_examples(boards, tokenizer), canvas_length=args.canvas, pad_id=tokenizer.pad_token_id)
    tokens = int(batch["attention_mask"].sum())

    rows = [
        ("sft (uniform, full recipe)", UniformObjective()),
        ("sft, no self-conditioning", UniformObjective(self_conditioning_prob=0.0)),
        ("ar-only (encoder loss)", EncoderARObjective()),
    ]
    results = []
    for name, objective in rows:
        times = time_steps(model, objective, batch, args.steps)
        results.append({
            "row": name,
            "median_step_ms": 1000 * statistics.median(times),
            "mean_step_ms": 1000 * statistics.fmean(times),
            "tokens_per_second": tokens / statistics.median(times),
        })
    ar_ms = results[-1]["median_step_ms"]
    for r in results:
        r["ratio_vs_ar"] = r["median_step_ms"] / ar_ms

    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads ({os.cpu_count()} cores visible)"
    table = Table(title=f"training step time: {args.shape}, batch {args.batch} ({tokens} tokens), canvas "
                        f"{args.canvas}; {machine}")
    for column in ("step", "median ms", "mean ms", "tokens/s", "x AR-only"):
        table.add_column(column, justify="right" if column != "step" else "left")
    for r in results:
        table.add_row(r["row"], f"{r['median_step_ms']:.0f}", f"{r['mean_step_ms']:.0f}",
                      f"{r['tokens_per_second']:.0f}", f"{r['ratio_vs_ar']:.2f}")
    console.print(table)
    atomic_write_json(RESULTS, {
        "benchmark": "step_time",
        "shape": args.shape,
        "batch_size": args.batch,
        "canvas_length": args.canvas,
        "batch_tokens": tokens,
        "timed_steps": args.steps,
        "machine": machine,
        "torch": torch.__version__,
        "rows": results,
        "sft_over_ar_ratio": results[0]["ratio_vs_ar"],
    })
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
