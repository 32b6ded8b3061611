"""Gates you can trust and runs that survive crashes (issue 12), one specification per case, on the tiny model:
a diverged run publishes nothing, every JSON is strict, one skip rule, no leftovers taken for releases, tokenizer
identity, one clear line per user error, one writer per output."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dg_pipeline.core.errors import GateFailed, InputError, TrainingDiverged
from dg_pipeline.core.io import atomic_dir, atomic_write_json, remove_leftovers
from dg_pipeline.core.lock import OutputLocked, output_lock
from dg_pipeline.stages import run_stage

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "model=tiny", "logger=none", "device=cpu",
    "data.n_train=48", "data.n_val=8", "data.n_eval=4",
    "trainer.batch_size=8", "trainer.max_steps=3", "trainer.warmup_steps=1", "trainer.val_check_interval=2",
    "trainer.progress_bar=none",
    "verify.batch_size=4", "verify.speed_examples=1", "verify.plots=false", "sampler.max_denoising_steps=4",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run dir holding base and a finished sft (model, training.json, passing verify.json)."""
    from helpers import compose

    root = tmp_path_factory.mktemp("trained")
    run_stage(compose("stage=base", f"run_dir={root}", *SMALL))
    run_stage(compose("stage=sft", f"run_dir={root}", *SMALL))
    return root


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    """A copy of the trained run dir, to break."""
    shutil.copytree(trained, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dg_pipeline", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error:", "interrupted"))]


# ------------------------------------------------------------------------------------------ 1. finite or nothing


def test_a_diverging_run_stops_at_the_first_non_finite_step_naming_the_step_and_the_lr_and_saves_nothing(
        run_copy, compose_cfg):
    shutil.rmtree(run_copy / "sft")
    with pytest.raises(TrainingDiverged) as diverged:
        run_stage(compose_cfg("stage=sft", f"run_dir={run_copy}", *SMALL, "trainer.lr=1e12"))
    message = str(diverged.value)
    assert "stage=sft:" in message and " at step " in message and "trainer.lr=1e+12 is too large" in message
    assert not (run_copy / "sft" / "model").exists() and not (run_copy / "sft" / "verify.json").exists()
    assert not (run_copy / "sft" / "training.json").exists()


def test_every_json_the_pipeline_writes_is_strict_with_non_finite_figures_as_null_and_named(tmp_path):
    path = atomic_write_json(tmp_path / "r.json", {"val_loss": float("nan"), "gate": {"speedup": float("inf")},
                                                   "curve": [1.0, float("-inf")]})

    def refuse(constant):
        raise ValueError(f"bare {constant}")

    record = json.loads(path.read_text(), parse_constant=refuse)
    assert record["val_loss"] is None and record["gate"]["speedup"] is None and record["curve"] == [1.0, None]
    assert record["non_finite"] == {"val_loss": "nan", "gate.speedup": "inf", "curve[1]": "-inf"}


def test_a_model_with_non_finite_weights_fails_its_gate(trained, tmp_path):
    import torch

    from dg_pipeline.model import load_model, save_model
    from helpers import write_sft_gate

    model, tokenizer = load_model(trained / "sft" / "model")
    with torch.no_grad():
        model.model.decoder.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    save_model(model, tokenizer, tmp_path / "sft" / "model")
    with pytest.raises(GateFailed, match="non_finite_weights"):
        write_sft_gate(tmp_path / "sft" / "model", *SMALL)
    record = json.loads((tmp_path / "sft" / "verify.json").read_text())
    assert record["passed"] is False and record["non_finite_tensors"]


# ------------------------------------------------------------------------------------------ 3. one skip rule


def test_an_sft_output_is_reused_only_with_its_passed_gate_record_and_the_same_fingerprint(
        run_copy, compose_cfg, capsys):
    cfg = compose_cfg("stage=sft", f"run_dir={run_copy}", *SMALL)
    assert run_stage(cfg)["skipped"] is True
    (run_copy / "sft" / "verify.json").unlink()  # e.g. killed during its gate
    capsys.readouterr()
    assert "skipped" not in run_stage(cfg)
    out = " ".join(capsys.readouterr().out.split())
    assert "sft: training again:" in out and "has no gate record" in out
    assert json.loads((run_copy / "sft" / "verify.json").read_text())["passed"] is True

    run_stage(compose_cfg("stage=sft", f"run_dir={run_copy}", *SMALL, "trainer.lr=0.004"))
    assert "was made with other trainer settings" in " ".join(capsys.readouterr().out.split())


def test_an_empty_eval_file_is_found_before_any_training(run_copy, compose_cfg, tmp_path):
    empty = tmp_path / "eval.jsonl"
    empty.write_text("")
    shutil.rmtree(run_copy / "sft")
    with pytest.raises(InputError, match=r"data.eval_path=.*eval.jsonl: the file holds no examples"):
        run_stage(compose_cfg("stage=sft", f"run_dir={run_copy}", *SMALL, f"data.eval_path={empty}"))
    assert not (run_copy / "sft").exists()  # no experiment dir, no checkpoint, no model


# ------------------------------------------------------------------------------------------ 5. no leftovers


def test_temporary_dirs_of_a_killed_writer_are_removed_by_the_next_run_of_that_stage(run_copy, compose_cfg):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    host = socket.gethostname().replace(".", "_").replace("-", "_")
    leftover = run_copy / "base" / f".model.{host}-{dead.pid}.x1y2.tmp"
    legacy = run_copy / "base" / ".model.k3j_x9.tmp"  # an older version's name, without its writer
    for d in (leftover, legacy):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    run_stage(compose_cfg("stage=base", f"run_dir={run_copy}", *SMALL))  # skipped: its output is up to date
    assert not leftover.exists() and not legacy.exists()


def test_a_live_writers_temporary_dir_is_left_alone(tmp_path):
    import socket

    host = socket.gethostname().replace(".", "_").replace("-", "_")
    mine = tmp_path / f".model.{host}-{os.getpid()}.abc.tmp"
    mine.mkdir()
    assert remove_leftovers(tmp_path / "model") == [] and mine.exists()


def test_a_swap_interrupted_between_its_two_renames_is_recovered(tmp_path):
    old = tmp_path / ".model.old"  # atomic_dir moved the old output aside, then the process died
    old.mkdir()
    (old / "config.json").write_text("{}")
    with atomic_dir(tmp_path / "model") as tmp:
        assert (tmp_path / "model" / "config.json").is_file()  # put back before the new write starts
        (tmp / "config.json").write_text('{"new": true}')
    assert json.loads((tmp_path / "model" / "config.json").read_text()) == {"new": True}
    assert not old.exists()


# ------------------------------------------------------------------------------------------ 6. tokenizer identity


def test_a_tokenizer_with_two_ids_swapped_is_refused_naming_both_files(trained, tmp_path):
    from dg_pipeline.model import load_model

    model_dir = tmp_path / "model"
    shutil.copytree(trained / "sft" / "model", model_dir)
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tokenizer_json["model"]["vocab"]
    vocab["1"], vocab["2"] = vocab["2"], vocab["1"]  # same size, two digits swapped
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    with pytest.raises(InputError) as refused:
        load_model(model_dir)
    message = str(refused.value)
    assert f"{model_dir / 'tokenizer.json'}: this tokenizer" in message
    assert f"recorded in {model_dir / 'tokenizer_identity.json'}" in message


# ------------------------------------------------------------------------------------------ 7. clear errors


def test_a_truncated_weights_file_is_named(trained, tmp_path):
    from dg_pipeline.model import load_model

    model_dir = tmp_path / "model"
    shutil.copytree(trained / "sft" / "model", model_dir)
    with open(model_dir / "model.safetensors", "r+b") as f:
        f.truncate(20_000)
    with pytest.raises(InputError, match=rf"{model_dir / 'model.safetensors'} is damaged .*truncated"):
        load_model(model_dir)


@pytest.mark.parametrize("override, expected", [
    ("trainer.max_step=5", "trainer.max_step: unknown key; did you mean trainer.max_steps"),
    ("max_steps=5", "max_steps: unknown key; did you mean trainer.max_steps?"),
    ("trainer.max_steps=abc", "trainer.max_steps=abc: must be an integer (its default: trainer.max_steps=1500)"),
    ("trainer.lr=fast", "trainer.lr=fast: must be a number (its default: trainer.lr=0.005)"),
    ("recipe=nope", "Could not find 'recipe/nope'; choose one of chat, sudoku4, sudoku9"),
])
def test_a_bad_override_is_one_line_naming_the_key_and_the_fix_before_any_work(override, expected):
    from dg_pipeline.settings.command_line import check_command_line

    with pytest.raises(InputError) as bad:
        check_command_line([override, "stage=sft"])
    assert expected in str(bad.value) and "\n" not in str(bad.value)


def test_the_cli_refuses_a_bad_override_in_one_line_and_generates_no_data(tmp_path):
    proc = cli("stage=sft", f"run_dir={tmp_path}", "trainer.max_step=5")
    assert proc.returncode == 1
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "trainer.max_step: unknown key; did you mean trainer.max_steps" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())


def test_a_jsonl_error_names_the_line_and_the_real_column(tmp_path):
    from dg_pipeline.data.readers import read_chat_jsonl

    path = tmp_path / "chat.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": }\n')
    with pytest.raises(InputError, match=rf"{path}:2: invalid JSON at column 31"):
        read_chat_jsonl(path)


def test_ctrl_c_during_training_prints_one_line_and_leaves_no_output(run_copy):
    shutil.rmtree(run_copy / "sft")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [a for a in SMALL if not a.startswith(("trainer.max_steps", "trainer.val_check_interval"))]
    proc = subprocess.Popen([sys.executable, "-m", "dg_pipeline", "stage=sft", f"run_dir={run_copy}", *args,
                             "trainer.max_steps=100000", "trainer.val_check_interval=100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal runs it
    deadline = time.time() + 300
    while not (run_copy / "sft" / "exp").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    time.sleep(5)  # into the training steps
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert error_lines(stderr) == [line for line in stderr.splitlines() if line.startswith("interrupted (Ctrl-C)")]
    assert len(error_lines(stderr)) == 1 and "Traceback" not in stderr
    assert not (run_copy / "sft" / "model").exists() and not (run_copy / "sft" / "verify.json").exists()
    assert not list((run_copy / "sft").glob(".*.tmp"))


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (user + mount namespace) for a tmpfs")
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path):
    base = tmp_path / "run" / "base"
    base.mkdir(parents=True)
    command = (f"mount -t tmpfs -o size=300k tmpfs {base} && {sys.executable} -m dg_pipeline stage=base "
               f"run_dir={tmp_path / 'run'} {' '.join(SMALL)} > /dev/null; code=$?; echo LISTING; ls -A {base}; "
               "exit $code")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -rm is not allowed here: {probe.stderr.decode().strip()}")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: no space left on device") and "Traceback" not in proc.stderr
    left = proc.stdout.split("LISTING")[-1].split()
    assert "model" not in left and not [name for name in left if name.endswith(".tmp")], left  # nothing half-written


# ------------------------------------------------------------------------------------------ 8. one writer per output


def test_a_second_writer_of_an_output_is_refused_naming_the_first_and_a_dead_ones_lock_is_taken_over(
        run_copy, compose_cfg, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dg_pipeline.core.lock import output_lock\n"
         f"with output_lock({str(run_copy)!r}, {str(run_copy / 'base' / 'model')!r}):\n"
         "    print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = compose_cfg("stage=base", f"run_dir={run_copy}", *SMALL, "force=true")
        with pytest.raises(OutputLocked) as locked:
            run_stage(cfg)
        message = str(locked.value)
        assert f"{run_copy / 'base' / 'model'} is being written by another process: pid {holder.pid} on " in message
        assert "since " in message and "output_lock" in message  # its command line
    finally:
        holder.kill()
        holder.wait()
    capsys.readouterr()
    run_stage(cfg)
    assert f"took over the lock of pid {holder.pid}" in " ".join(capsys.readouterr().out.split())


def test_two_writers_of_one_plot_do_not_collide(tmp_path):
    from matplotlib.figure import Figure

    from dg_pipeline.verify.plots import save_figure

    errors = []

    def draw():
        try:
            fig = Figure()
            fig.add_subplot().plot(range(50))
            for _ in range(5):
                save_figure(fig, tmp_path / "plot.png")
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=draw) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == [] and (tmp_path / "plot.png").stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_a_lock_is_released_when_its_holder_finishes(tmp_path):
    with output_lock(tmp_path, tmp_path / "sft" / "model"):
        pass
    with output_lock(tmp_path, tmp_path / "sft" / "model"):  # no error: nobody holds it
        pass
