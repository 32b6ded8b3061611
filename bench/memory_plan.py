"""Benchmark: the memory planner (`stage=plan`, dg_pipeline/training/memory_plan.py) against measured peaks on CPU,
and the plan of DiffusionGemma 26B-A4B on 8 x 80 GB.

    python -m bench.memory_plan [--cases sudoku4,sudoku9] [--threads 1]

Measured: the peak of the bytes held by torch's CPU allocator during one training step (forward, backward, AdamW
step), from torch.profiler's memory events (profile_memory=True) on top of what was alive before the step
(parameters, optimizer state; counted from their storages). One process (strategy auto) and 2 gloo processes
(FSDP2 through dg_pipeline.training.sharding, rank 0) at the same global batch, fp32 (`32-true`). Planned: the
same configuration through `plan_memory`. Then the 26B-A4B plan (FSDP2 on 8 ranks, bf16-mixed, 4,096 tokens per
GPU: batch 1 x 2,048 prompt + 2,048 answer tokens) with and without activation checkpointing and expert
parallelism. Prints tables and writes bench/results/memory_plan.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "memory_plan.json"


@dataclass(frozen=True)
class Case:
    shape: str
    prompt: int
    response: int
    canvas: int
    batch: int  # global batch (split over the ranks)


CASES = {
    "tiny": Case("tiny", 6, 5, 8, 4),
    "sudoku4": Case("sudoku4", 18, 17, 17, 16),
    "sudoku9": Case("sudoku9", 83, 82, 96, 4),
}


def build(case: Case):
    from dg_pipeline.data.tokenizer import build_board_tokenizer
    from dg_pipeline.model.configs import build_model
    from dg_pipeline.training.module import freeze_router, freeze_vision

    tok = build_board_tokenizer()
    model = build_model(case.shape, tok, case.canvas, seed=0).train()
    freeze_router(model)
    freeze_vision(model)
    return model, tok


def batch_of(case: Case, rows: range):
    from dg_pipeline.data.collate import collate
    from dg_pipeline.data.examples import Example

    examples = [Example([2] + [6 + i % 10] * (case.prompt - 2) + [5], [7] * (case.response - 1) + [1], {})
                for i in rows]
    return collate(examples, case.canvas, 0, keys=[(0, i) for i in rows])


def _storages_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    seen = {}
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if isinstance(t, DTensor) else t
        if t.is_meta:
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def profiled_peak(step, alive) -> int:
    """Peak bytes of torch's CPU allocator during `step()`: the live bytes before it (`alive()`) plus the highest
    running sum of the profiler's allocation (+) and free (-) events."""
    step()  # warm-up: optimizer state exists, lazy buffers are made
    baseline = alive()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return baseline + peak


def training_step(network, optimizer, batch):
    from dg_pipeline.objective import NoiseKey

    def step():
        network.loss(batch, NoiseKey(0)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(case: Case, mesh=None) -> int:
    """Measured peak of one step: one process, or this rank's under FSDP2 on `mesh`."""
    from dg_pipeline.objective import ObjectiveForward, UniformObjective
    from dg_pipeline.training.module import parameter_groups
    from dg_pipeline.settings import ParallelSettings
    from dg_pipeline.training.sharding import shard_network

    model, _ = build(case)
    network = ObjectiveForward(model, UniformObjective())
    rows = range(case.batch)
    if mesh is not None:
        ranks, rank = mesh.size(), mesh.get_local_rank()
        shard_network(network, model, mesh, ParallelSettings(strategy="fsdp", devices=ranks))
        per_rank = case.batch // ranks
        rows = range(rank * per_rank, (rank + 1) * per_rank)
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-4), lr=1e-4)

    def alive():
        state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return _storages_bytes([*model.parameters(), *model.buffers(), *state])

    return profiled_peak(training_step(network, optimizer, batch_of(case, rows)), alive)


def planned(case: Case, strategy: str, ranks: int, **layout) -> dict:
    from dg_pipeline.model.configs import build_config
    from dg_pipeline.model.sharded_io import meta_model
    from dg_pipeline.settings import ParallelSettings, PlanSettings
    from dg_pipeline.training.memory_plan import Workload, plan_memory
    from dg_pipeline.training.module import freeze_router, freeze_vision

    model = meta_model(build_config(case.shape, 16, case.canvas))
    freeze_router(model)
    freeze_vision(model)
    work = Workload(batch=case.batch // ranks, prompt=case.prompt, response=case.response, canvas=case.canvas)
    return plan_memory(model, ParallelSettings(strategy=strategy, devices=ranks, **layout), ranks, work,
                       PlanSettings())


def plan_26b(activation_checkpointing: bool, expert_parallel: int) -> dict:
    from dg_pipeline.model.configs import build_config
    from dg_pipeline.model.sharded_io import meta_model
    from dg_pipeline.settings import ParallelSettings, PlanSettings
    from dg_pipeline.training.memory_plan import Workload, plan_memory
    from dg_pipeline.training.module import freeze_router, freeze_vision

    model = meta_model(build_config("diffusiongemma_26b_a4b", 262_144, 256))
    freeze_router(model)
    freeze_vision(model)
    parallel = ParallelSettings(strategy="fsdp", devices=8, precision="bf16-mixed",
                                activation_checkpointing=activation_checkpointing, expert_parallel=expert_parallel)
    return plan_memory(model, parallel, 8, Workload(batch=1, prompt=2048, response=2048, canvas=256),
                       PlanSettings(device_memory_gb=80), foreach_optimizer=True)


def fsdp_rank_main(cases: list[str], out: str) -> None:
    """Under torchrun (2 processes): each case's FSDP2 step peak on rank 0, written to `out`."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    peaks = {name: measure(CASES[name], mesh) for name in cases}
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(peaks))
    dist.destroy_process_group()


def fsdp_peaks(cases: list[str], threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fsdp.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                   "-m", "bench.memory_plan", "--fsdp-rank", "--cases", ",".join(cases), "--out", str(out)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(done.stderr[-4000:])
        return json.loads(out.read_text())


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="sudoku4,sudoku9")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fsdp-rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [c for c in args.cases.split(",") if c]
    if args.fsdp_rank:
        fsdp_rank_main(cases, args.out)
        return

    console = Console(width=120)
    rows = []
    fsdp = fsdp_peaks(cases, args.threads)
    for name in cases:
        case = CASES[name]
        for strategy, ranks, measured in (("auto", 1, measure(case)), ("fsdp", 2, fsdp[name])):
            plan = planned(case, strategy, ranks)["peak_bytes_per_device"]
            rows.append({"case": name, "strategy": strategy, "ranks": ranks, "global_batch": case.batch,
                         "measured_bytes": measured, "planned_bytes": plan,
                         "planned_over_measured": round(plan / measured, 3)})
    table = Table(title="planner vs measured peak per device, CPU fp32 (torch.profiler memory events)")
    for column in ("case", "strategy x ranks", "global batch", "measured MB", "planned MB", "planned / measured"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["case"], f"{r['strategy']} x {r['ranks']}", str(r["global_batch"]),
                      f"{r['measured_bytes'] / 1e6:.1f}", f"{r['planned_bytes'] / 1e6:.1f}",
                      f"{r['planned_over_measured']:.2f}")
    console.print(table)

    plans = []
    table = Table(title="DiffusionGemma 26B-A4B, FSDP2 on 8 x 80 GB, bf16-mixed, 4,096 tokens per GPU (GB per GPU)")
    for column in ("activation ckpt", "expert parallel", "params", "grads", "optim", "gathered", "activations",
                   "transient", "peak", "<= 72 GB"):
        table.add_column(column)
    for checkpointing in (False, True):
        for ep in (1, 8):
            plan = plan_26b(checkpointing, ep)
            plans.append(plan)
            b = {k: v / 1e9 for k, v in plan["bytes_per_device"].items()}
            table.add_row(str(checkpointing), str(ep), *(f"{b[k]:.1f}" for k in (
                "parameters", "gradients", "optimizer", "gathered", "activations", "transient")),
                f"{plan['peak_gb_per_device']:.1f}", "yes" if plan["peak_gb_per_device"] <= 72 else "no")
    console.print(table)
    record = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                          "load_average": os.getloadavg(), "torch": torch.__version__},
              "cpu_cases": rows, "plan_26b_a4b": plans}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=1))
    console.print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
