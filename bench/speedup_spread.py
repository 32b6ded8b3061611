"""Benchmark: how much speedup_vs_ar moves with machine load, for the same model, in one run.

    python -m bench.speedup_spread --model runs/x/sft/model                 # 4x4 boards, the gate's measurement
    python -m bench.speedup_spread --model runs/x/sft/model --rounds 9 --busy 1

The gate's own batch-1 measurement (dg_pipeline.verify: interleaved diffusion/AR rounds, median, spread, lower
confidence bound of the median speedup) run under two conditions, alternating round by round so drift in the
machine's own load falls on both: `quiet` (nothing added) and `loaded` (`--busy` background processes spinning a
CPU core each, started before and stopped after each loaded round). Prints one table and writes
bench/results/speedup_spread-<model>.json. The machine's load average is recorded: "quiet" means nothing this
benchmark added.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from dg_pipeline.core.io import atomic_write_json
from dg_pipeline.data import generate_boards, sudoku_examples
from dg_pipeline.model import load_model
from dg_pipeline.sampling import SamplerConfig
from dg_pipeline.verify.gate import ar_decoder, diffusion_decoder, measure_speed, resolve_max_new_tokens
from dg_pipeline.verify.passes import DecodePass
from dg_pipeline.verify.speed import speed_summary

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CONDITIONS = ("quiet", "loaded")
BUSY_LOOP = "while True: pass"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="a DiffusionGemma model dir (e.g. <run>/sft/model)")
    p.add_argument("--size", type=int, default=4, choices=(4, 9), help="Sudoku boards the prompts are")
    p.add_argument("--examples", type=int, default=16, help="boards per round (the gate's verify.speed_examples)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per condition (the gate's verify.speed_rounds)")
    p.add_argument("--confidence", type=float, default=0.95, help="of the median speedup's lower bound")
    p.add_argument("--busy", type=int, default=1, help="busy background processes in the loaded condition")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


class BusyProcesses:
    """`n` processes spinning one core each while the context is open."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(self.n)]
        time.sleep(0.2)  # let them reach the CPU before the timing starts
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.kill()
            proc.wait()


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=torch.float32, device="cpu")
    clues = (4, 10) if args.size == 4 else (30, 45)
    examples = sudoku_examples(generate_boards(args.size, args.examples, *clues, seed=args.seed), tokenizer)
    max_new = resolve_max_new_tokens(None, "sudoku", examples)
    decoders = {"diffusion": diffusion_decoder(model, SamplerConfig.for_model(model), tokenizer, max_new, args.seed),
                "ar": ar_decoder(model, tokenizer, max_new)}
    passes: dict[str, dict[str, list[DecodePass]]] = {c: {name: [] for name in decoders} for c in CONDITIONS}
    load: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    measure_speed(decoders, examples[:1], 1, tokenizer, None)  # warm-up
    for r in range(args.rounds):
        for condition in CONDITIONS if r % 2 == 0 else CONDITIONS[::-1]:
            busy = BusyProcesses(args.busy if condition == "loaded" else 0)
            with busy:
                one = measure_speed(decoders, examples, 1, tokenizer, None)
            for name, runs in one.items():
                passes[condition][name].extend(runs)
            load[condition].append(os.getloadavg()[0])
    results = {c: speed_summary(passes[c], args.confidence) for c in CONDITIONS}
    for c in CONDITIONS:
        results[c]["load_average_1m"] = load[c]

    table = Table(title=f"speedup_vs_ar spread: {args.model} ({args.examples} boards x {args.rounds} rounds per "
                        f"condition, batch 1, {torch.get_num_threads()} torch thread(s), {os.cpu_count()} cores)")
    for col in ("condition", "speedup median", "min", "max", "relative range", f"lower bound @{args.confidence:.0%}",
                "diffusion tok/s", "AR tok/s", "load avg"):
        table.add_column(col, justify="left" if col == "condition" else "right")
    for c in CONDITIONS:
        res, s = results[c], results[c]["speedup_vs_ar_spread"]
        label = c if c == "quiet" else f"{c} ({args.busy} busy process{'es' if args.busy > 1 else ''})"
        bound = res["speedup_vs_ar_lower_bound"]
        table.add_row(label, f"{res['speedup_vs_ar_median']:.2f}x", f"{s['min']:.2f}x", f"{s['max']:.2f}x",
                      f"{s['relative_range']:.0%}", "-" if bound is None else f"{bound:.2f}x",
                      f"{res['decoders']['diffusion']['tokens_per_second_median']:.1f}",
                      f"{res['decoders']['ar']['tokens_per_second_median']:.1f}",
                      f"{sum(load[c]) / len(load[c]):.1f}")
    Console(width=200).print(table)
    record = {"model": str(args.model), "size": args.size, "examples": args.examples, "rounds": args.rounds,
              "busy_processes": args.busy, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
              "conditions": results}
    out = args.out or RESULTS / f"speedup_spread-{args.model.parent.name}-{args.model.name}.json"
    atomic_write_json(out, record)
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
