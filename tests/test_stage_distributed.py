"""Specification of multi-process runs as a user starts them (`python -m dg_pipeline ... trainer.devices=2`, and
torchrun on two "nodes" of localhost), on the tiny model with gloo: `stage=all` under DDP and under FSDP runs to
the end with one set of outputs; a 2-rank sharded run killed with SIGKILL after a checkpoint, started again (here
under torchrun, 2 nodes x 1 process), resumes and ends with the losses and weights of the run never interrupted.
(bench.sharded measures the same runs: wall times, and the differences after a resume.)"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.sharded import SMALL, differences, env, kill_after_first_checkpoint, pipeline
from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
FSDP = ["trainer.strategy=fsdp", "trainer.devices=2"]
DDP = ["trainer.strategy=ddp", "trainer.devices=2"]
TIMEOUT = 900


def outputs(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.glob("*/*") if "exp" not in p.parts}


@pytest.fixture(scope="module")
def fsdp_all(tmp_path_factory):
    """stage=all under FSDP on 2 ranks with the default run dir (runs/<timestamp> under the working dir)."""
    cwd = tmp_path_factory.mktemp("fsdp_all")
    started = time.perf_counter()
    done = pipeline("stage=all", *SMALL, *FSDP, cwd=cwd)
    return list((cwd / "runs").iterdir()), done, time.perf_counter() - started


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
    assert {"base/model", "sft/model", "sft/verify.json", "quantize/fp8", "export/fp8"} <= outputs(run_dir)
    assert json.loads((run_dir / "sft" / "verify.json").read_text())["passed"]
    # Rank 1 trained, waited for rank 0's stages and left: one "done" line, no second gate or export.
    assert done.stdout.count("[all] done") == 1 and done.stdout.count("gate: PASS") == 3
    print(f"stage=all ddp x2: {seconds:.1f} s")


def test_stage_all_under_fsdp_on_two_ranks_resolves_the_run_dir_once(fsdp_all):
    runs, done, seconds = fsdp_all
    assert len(runs) == 1, runs  # the ranks Lightning launched used rank 0's runs/<timestamp>
    run_dir = runs[0]
    assert {"base/model", "sft/model", "quantize/fp8", "export/fp8"} <= outputs(run_dir)
    figures = json.loads((run_dir / "sft" / "training.json").read_text())
    assert figures["steps"] == 8 and figures["final_train_loss"] is not None
    # Checkpoints are sharded (DCP: one file per rank); the final validation at step 8 (the schedule validates at
    # 3 and 6) re-entered configure_model on the sharded model, a no-op the second time.
    (checkpoint,) = (run_dir / "sft" / "exp" / "checkpoints").glob("*-last.ckpt")
    assert (checkpoint / ".metadata").is_file() and len(list(checkpoint.glob("*.distcp"))) == 2
    assert figures["val_loss"] is not None
    assert done.stdout.count("[all] done") == 1
    print(f"stage=all fsdp x2: {seconds:.1f} s")


def test_ddp_and_fsdp_train_the_same_model(ddp_all, fsdp_all):
    d = differences(ddp_all[0], fsdp_all[0][0])
    assert d["final_train_loss"] < 1e-5 and d["val_loss"] < 1e-5 and d["weights_max_abs"] < 1e-5


def test_a_killed_sharded_run_started_again_under_torchrun_on_two_nodes_resumes_to_the_uninterrupted_result(
        tmp_path, fsdp_all):
    run_dir = tmp_path / "run"
    pipeline("stage=base", f"run_dir={run_dir}", *SMALL)
    kill_after_first_checkpoint(["stage=sft", f"run_dir={run_dir}", *SMALL, *FSDP],
                                run_dir / "sft" / "exp" / "checkpoints")
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

    d = differences(run_dir, fsdp_all[0][0])
    assert d["resumed_from"] and json.loads((run_dir / "sft" / "training.json").read_text())["steps"] == 8
    assert d["final_train_loss"] < 1e-5 and d["val_loss"] < 1e-5
    assert d["weights_max_abs"] < 1e-5 and d["gate_accuracy"] == 0
