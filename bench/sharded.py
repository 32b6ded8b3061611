"""Benchmark: multi-process runs on the tiny model as a user starts them (gloo on CPU): `stage=all` wall time on 1
process, under DDP x 2 and FSDP2 x 2 (interleaved rounds, median and spread), and kill -9 then resume against an
uninterrupted run (1 process and FSDP2 x 2): the largest difference of the final train loss, val loss, gate
accuracy and weights.

    python -m bench.sharded [--rounds 3] [--skip-resume]

Prints tables and writes bench/results/sharded.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "sharded.json"
# The tiny run of tests/test_stage_distributed.py: 8 SFT steps, validation (and a checkpoint) every 3.
SMALL = [
    "model=tiny", "logger=none", "data.n_train=48", "data.n_val=8", "data.n_eval=4", "trainer.batch_size=4",
    "trainer.max_steps=8", "trainer.warmup_steps=1", "trainer.val_check_interval=3", "trainer.progress_bar=none",
    "verify.batch_size=4", "verify.speed_examples=1", "verify.plots=false", "sampler.max_denoising_steps=4",
    "device=cpu", "quant.formats=[fp8]", "calib.n_samples=4", "calib.batch_size=4", "quant.probe_prompts=2",
]
LAYOUTS = {"1 process": [], "ddp x 2": ["trainer.strategy=ddp", "trainer.devices=2"],
           "fsdp x 2": ["trainer.strategy=fsdp", "trainer.devices=2"]}


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def pipeline(*args: str, cwd: Path = ROOT, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m dg_pipeline <args>`; raises with its output's tail when it fails."""
    done = subprocess.run([sys.executable, "-m", "dg_pipeline", *args], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"dg_pipeline {' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}"
                           f"\n{done.stderr[-5000:]}")
    return done


def complete_checkpoint(checkpoints: Path) -> bool:
    """A finished checkpoint (a file, or a DCP dir with its metadata) without NeMo's unfinished marker."""
    for path in checkpoints.glob("*.ckpt"):
        done = path.is_file() or ((path / ".metadata").is_file() and (path / "meta.pt").is_file())
        if done and not Path(str(path).removesuffix(".ckpt") + "-unfinished").exists():
            return True
    return False


def kill_after_first_checkpoint(args: list[str], checkpoints: Path, delay: float = 0.0, timeout: int = 900) -> None:
    """Start `python -m dg_pipeline <args>` and SIGKILL its whole process group (every rank) `delay` seconds after
    its first complete checkpoint appears."""
    process = subprocess.Popen([sys.executable, "-m", "dg_pipeline", *args], cwd=ROOT, env=env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not complete_checkpoint(checkpoints) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(delay)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def sft_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "sft" / "model" / "model.safetensors"))


def differences(run_dir: Path, reference: Path) -> dict:
    """Largest differences of run_dir's sft outputs from reference's: training figures, gate accuracy, weights."""
    a = json.loads((run_dir / "sft" / "training.json").read_text())
    b = json.loads((reference / "sft" / "training.json").read_text())
    wa, wb = sft_weights(run_dir), sft_weights(reference)
    gates = [json.loads((d / "sft" / "verify.json").read_text())["accuracy"] for d in (run_dir, reference)]
    return {
        "final_train_loss": abs(a["final_train_loss"] - b["final_train_loss"]),
        "val_loss": abs(a["val_loss"] - b["val_loss"]),
        "gate_accuracy": abs(gates[0] - gates[1]),
        "weights_max_abs": max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa),
        "resumed_from": a["resumed_from"],
    }


def resume_case(layout: list[str], work: Path, delay: float) -> dict:
    """An uninterrupted sft and one killed after its first checkpoint (+ delay) then run again: their differences."""
    runs = {}
    for name in ("uninterrupted", "resumed"):
        run_dir = work / name
        pipeline("stage=base", f"run_dir={run_dir}", *SMALL)
        args = ["stage=sft", f"run_dir={run_dir}", *SMALL, *layout]
        if name == "resumed":
            kill_after_first_checkpoint(args, run_dir / "sft" / "exp" / "checkpoints", delay)
            if (run_dir / "sft" / "model").exists():
                raise RuntimeError("the run finished before it was killed; use a shorter --kill-delay")
        pipeline(*args)
        runs[name] = run_dir
    return differences(runs["resumed"], runs["uninterrupted"])


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kill-delay", type=float, default=0.0, help="seconds after the first checkpoint")
    parser.add_argument("--skip-resume", action="store_true")
    args = parser.parse_args()
    console = Console(width=120)
    record = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "load_average_start": os.getloadavg()}, "stage_all_seconds": {}, "resume": {}}
    with tempfile.TemporaryDirectory() as tmp:
        times = {name: [] for name in LAYOUTS}
        for r in range(args.rounds):  # interleaved: one run of each layout per round
            for name, layout in LAYOUTS.items():
                started = time.perf_counter()
                pipeline("stage=all", f"run_dir={Path(tmp) / f'all-{r}-{len(times[name])}-{name[:4]}'}", *SMALL,
                         *layout)
                times[name].append(time.perf_counter() - started)
        if args.rounds:
            table = Table(title=f"stage=all on the tiny model, {args.rounds} interleaved round(s) (wall seconds)")
            for column in ("layout", "median", "min", "max"):
                table.add_column(column)
            for name, values in times.items():
                record["stage_all_seconds"][name] = values
                table.add_row(name, f"{statistics.median(values):.1f}", f"{min(values):.1f}", f"{max(values):.1f}")
            console.print(table)
        if not args.skip_resume:
            table = Table(title="kill -9 after the first checkpoint, then the same command, vs never interrupted")
            for column in ("layout", "|d final loss|", "|d val loss|", "|d gate accuracy|", "max |d weight|"):
                table.add_column(column)
            for name in ("1 process", "fsdp x 2"):
                d = resume_case(LAYOUTS[name], Path(tmp) / f"resume-{name[:4]}", args.kill_delay)
                record["resume"][name] = d
                table.add_row(name, f"{d['final_train_loss']:.2e}", f"{d['val_loss']:.2e}",
                              f"{d['gate_accuracy']:.2e}", f"{d['weights_max_abs']:.2e}")
            console.print(table)
    record["machine"]["load_average_end"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=1))
    console.print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
