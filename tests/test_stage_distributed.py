"""Specification of multi-process runs as a user starts them (`python -m dg_pipeline ... trainer.devices=2`, and
torchrun on two "nodes" of localhost), on the tiny model with gloo: `stage=all` under DDP and under FSDP runs to
the end with one set of outputs; a 2-rank sharded run killed with SIGKILL after a checkpoint, started again (here
under torchrun, 2 nodes x 1 process), resumes and ends with the losses and weights of the run never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "model=tiny", "logger=none", "data.n_train=48", "data.n_val=8", "data.n_eval=4", "trainer.batch_size=4",
    "trainer.max_steps=8", "trainer.warmup_steps=1", "trainer.val_check_interval=2", "trainer.progress_bar=none",
    "verify.batch_size=4", "verify.speed_examples=1", "verify.plots=false", "sampler.max_denoising_steps=4",
    "device=cpu", "quant.formats=[fp8]", "calib.n_samples=4", "calib.batch_size=4", "quant.probe_prompts=2",
]
FSDP = ["trainer.strategy=fsdp", "trainer.devices=2"]
DDP = ["trainer.strategy=ddp", "trainer.devices=2"]
TIMEOUT = 600


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def pipeline(*args, cwd=ROOT, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "dg_pipeline", *args], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def outputs(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.glob("*/*") if "exp" not in p.parts)


@pytest.fixture(scope="module")
def fsdp_all(tmp_path_factory):
    """stage=all under FSDP on 2 ranks with the default run dir (runs/<timestamp> under the working dir)."""
    cwd = tmp_path_factory.mktemp("fsdp_all")
    started = time.perf_counter()
    done = pipeline("stage=all", *SMALL, *FSDP, cwd=cwd)
    runs = list((cwd / "runs").iterdir())
    return runs, done, time.perf_counter() - started


@pytest.fixture(scope="module")
def ddp_all(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp_all")
    started = time.perf_counter()
    done = pipeline("stage=all", f"run_dir={run_dir}", *SMALL, *DDP)
    return run_dir, done, time.perf_counter() - started


def test_stage_all_under_ddp_on_two_ranks_runs_to_the_end_with_one_set_of_outputs(ddp_all):
    run_dir, done, seconds = ddp_all
    summary = json.loads((run_dir / "all" / "summary.json").read_text())
    assert list(summary["stages"]) == ["base", "sft", "quantize[fp8]", "export[fp8]"]
    assert {"base/model", "sft/model", "sft/verify.json", "quantize/fp8", "export/fp8"} <= set(outputs(run_dir))
    assert json.loads((run_dir / "sft" / "verify.json").read_text())["passed"]
    # Rank 1 trained, waited for rank 0's stages and left: one "done" line, no second gate or export.
    assert done.stdout.count("[all] done") == 1 and done.stdout.count("gate: PASS") == 3
    print(f"stage=all ddp x2: {seconds:.1f} s")


def test_stage_all_under_fsdp_on_two_ranks_resolves_the_run_dir_once(fsdp_all):
    runs, done, seconds = fsdp_all
    assert len(runs) == 1, runs  # the ranks Lightning launched used rank 0's runs/<timestamp>
    run_dir = runs[0]
    assert {"base/model", "sft/model", "quantize/fp8", "export/fp8"} <= set(outputs(run_dir))
    figures = json.loads((run_dir / "sft" / "training.json").read_text())
    assert figures["steps"] == 8 and figures["final_train_loss"] is not None
    checkpoint = run_dir / "sft" / "exp" / "checkpoints" / "sft-8-last.ckpt"
    assert (checkpoint / ".metadata").is_file() and len(list(checkpoint.glob("*.distcp"))) == 2  # sharded (DCP)
    assert done.stdout.count("[all] done") == 1
    print(f"stage=all fsdp x2: {seconds:.1f} s")


def weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "sft" / "model" / "model.safetensors"))


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def test_ddp_and_fsdp_train_the_same_model(ddp_all, fsdp_all):
    ddp_dir, fsdp_dir = ddp_all[0], fsdp_all[0][0]
    a = json.loads((ddp_dir / "sft" / "training.json").read_text())
    b = json.loads((fsdp_dir / "sft" / "training.json").read_text())
    assert abs(a["final_train_loss"] - b["final_train_loss"]) < 1e-5
    assert abs(a["val_loss"] - b["val_loss"]) < 1e-5
    assert max_weight_diff(ddp_dir, fsdp_dir) < 1e-5


def complete_checkpoint(checkpoints: Path) -> bool:
    return any((d / ".metadata").is_file() and (d / "meta.pt").is_file() and not
               Path(str(d).removesuffix(".ckpt") + "-unfinished").exists() for d in checkpoints.glob("*.ckpt"))


def test_a_killed_sharded_run_started_again_under_torchrun_on_two_nodes_resumes_to_the_uninterrupted_result(
        tmp_path, fsdp_all):
    run_dir = tmp_path / "run"
    pipeline("stage=base", f"run_dir={run_dir}", *SMALL)
    command = [sys.executable, "-m", "dg_pipeline", "stage=sft", f"run_dir={run_dir}", *SMALL, *FSDP]
    killed = subprocess.Popen(command, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    checkpoints = run_dir / "sft" / "exp" / "checkpoints"
    deadline = time.monotonic() + TIMEOUT
    while not complete_checkpoint(checkpoints) and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)  # rank 0 and the rank Lightning launched
    killed.wait()
    assert not (run_dir / "sft" / "model").exists(), "the run finished before it could be killed"

    # The same stage again, now as two torchrun "nodes" of one process each on localhost.
    port = free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
         "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "dg_pipeline", "stage=sft", f"run_dir={run_dir}",
         *SMALL, "trainer.strategy=fsdp", "trainer.devices=1", "trainer.num_nodes=2"],
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [node.communicate(timeout=TIMEOUT)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-4000:] + logs[1][-4000:]
    assert "sft: resuming from" in logs[0]

    reference = fsdp_all[0][0]
    resumed = json.loads((run_dir / "sft" / "training.json").read_text())
    uninterrupted = json.loads((reference / "sft" / "training.json").read_text())
    assert resumed["resumed_from"] and resumed["steps"] == uninterrupted["steps"] == 8
    for key in ("final_train_loss", "val_loss", "val_acc_t1", "val_acc_t05"):
        assert abs(resumed[key] - uninterrupted[key]) < 1e-5, key
    assert max_weight_diff(run_dir, reference) < 1e-5
    gates = [json.loads((d / "sft" / "verify.json").read_text())["accuracy"] for d in (run_dir, reference)]
    assert gates[0] == gates[1]
