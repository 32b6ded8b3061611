"""The cases of issue 12 ("gates you can trust, runs that survive crashes"), each run as a user would: the real CLI
on a fresh copy of one small finished run dir (tiny model: base, sft, quantize fp8, export fp8), recording the exit
code, the error line and what is on disk afterwards.

    python -m bench.crash_cases [--run-dir <a finished small run dir>] [--only <case> ...]

Prints a table and writes bench/results/crash_cases.json. Not a timing benchmark: the seconds are there to show
where a check fails (e.g. before any training), and move with machine load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dg_pipeline.core.io import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "crash_cases.json"
SMALL = [
    "model=tiny", "logger=none", "device=cpu",
    "data.n_train=48", "data.n_val=8", "data.n_eval=4",
    "trainer.batch_size=8", "trainer.max_steps=3", "trainer.warmup_steps=1", "trainer.val_check_interval=2",
    "trainer.progress_bar=none", "calib.n_samples=4", "calib.batch_size=4",
    "verify.batch_size=4", "verify.speed_examples=1", "verify.plots=false", "sampler.max_denoising_steps=4",
]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def cli(run_dir: Path, *args: str, timeout: int = 900, small: bool = True) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dg_pipeline", f"run_dir={run_dir}", *(SMALL if small else []),
                           *args], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO)
    return {"rc": proc.returncode, "stderr": proc.stderr, "stdout": proc.stdout,
            "seconds": round(time.perf_counter() - started, 1)}


def message(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith(("error:", "interrupted"))]
    return " | ".join(lines) if lines else ("(traceback) " + stderr.strip().splitlines()[-1] if stderr.strip() else "")


def lines_with(text: str, *needles: str) -> str:
    flat = " ".join(text.split())
    return "; ".join(n for n in needles if n in flat)


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else None


def non_strict_json(run_dir: Path) -> int:
    """JSON files under run_dir holding a bare NaN / Infinity."""
    bad = 0
    for p in run_dir.rglob("*.json"):
        try:
            json.loads(p.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        except ValueError:
            bad += 1
    return bad


def build_run(run_dir: Path) -> None:
    for stage in ("stage=base", "stage=sft", "stage=quantize quant=fp8", "stage=export quant=fp8"):
        out = cli(run_dir, *stage.split())
        if out["rc"] != 0:
            raise SystemExit(f"building the run dir failed at {stage}:\n{out['stderr'][-3000:]}")


# ----------------------------------------------------------------------------------------------------- cases


def nan_training(run: Path) -> dict:
    shutil.rmtree(run / "sft")
    out = cli(run, "stage=sft", "trainer.lr=1e12")
    return {**out, "disk": f"sft/model exists: {(run / 'sft' / 'model').exists()}; sft/verify.json exists: "
                           f"{(run / 'sft' / 'verify.json').exists()}; non-strict JSON files: {non_strict_json(run)}"}


def failed_overwrite(run: Path) -> dict:
    before = digest(run / "export" / "fp8" / "manifest.json")
    out = cli(run, "stage=export", "quant=fp8", "export.overwrite=true", "export.max_accuracy_drop=null",
              "verify.min_speedup=1000")
    rejected = run / "export" / "fp8.failed"
    return {**out, "disk": f"export/fp8 unchanged: {digest(run / 'export' / 'fp8' / 'manifest.json') == before}; "
                           f"export/fp8.failed/verify.json passed="
                           f"{json.loads((rejected / 'verify.json').read_text())['passed'] if rejected.exists() else '-'}"}


def skip_without_gate(run: Path) -> dict:
    (run / "sft" / "verify.json").unlink()
    out = cli(run, "stage=sft")
    flat = " ".join(out["stdout"].split())
    at = flat.find("training again:")
    return {**out, "message": "(stdout) sft: " + (flat[at:at + 150] if at >= 0 else "(no reason printed)"),
            "disk": f"sft/verify.json rewritten: {(run / 'sft' / 'verify.json').is_file()}"}


def empty_eval_file(run: Path) -> dict:
    empty = run / "empty.jsonl"
    empty.write_text("")
    shutil.rmtree(run / "sft")
    out = cli(run, "stage=sft", f"data.eval_path={empty}")
    return {**out, "disk": f"sft/ exists: {(run / 'sft').exists()} (no training, no checkpoint)"}


def killed_export(run: Path) -> dict:
    proc = subprocess.Popen([sys.executable, "-m", "dg_pipeline", f"run_dir={run}", *SMALL, "stage=export",
                             "quant=fp8", "export.overwrite=true"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV, cwd=REPO)
    deadline = time.time() + 600
    while not list((run / "export").glob(".fp8.*.tmp")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = sorted(p.name for p in (run / "export").iterdir())
    check = cli(run, "stage=check", small=False)
    again = cli(run, "stage=export", "quant=fp8", "export.overwrite=true")
    after = sorted(p.name for p in (run / "export").iterdir())
    shown = [ln for ln in " ".join(check["stdout"].split()).replace(" skip ", "\nskip ").replace(" PASS ", "\nPASS ")
             .splitlines() if ln.startswith(("skip", "PASS"))]
    return {"rc": check["rc"], "seconds": check["seconds"], "stderr": check["stderr"],
            "message": "(stage=check) " + " / ".join(s[:110] for s in shown),
            "disk": f"after kill -9: {left}; after the next export (rc {again['rc']}): {after}"}


def manifest_deleted(run: Path) -> dict:
    (run / "export" / "fp8" / "manifest.json").unlink()
    out = cli(run, "stage=check", small=False)
    skip = cli(run, "stage=check", "export.skip_hashes=true", small=False)
    return {**out, "disk": f"with export.skip_hashes=true: rc {skip['rc']}"}


def swapped_tokenizer(run: Path) -> dict:
    path = run / "sft" / "model" / "tokenizer.json"
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    vocab["1"], vocab["2"] = vocab["2"], vocab["1"]
    path.write_text(json.dumps(tok))
    out = cli(run, "stage=eval")
    return {**out, "disk": f"eval/verify.json written: {(run / 'eval' / 'verify.json').exists()}"}


def truncated_weights(run: Path) -> dict:
    with open(run / "sft" / "model" / "model.safetensors", "r+b") as f:
        f.truncate(20_000)
    out = cli(run, "stage=eval")
    return {**out, "disk": f"eval/ written: {(run / 'eval').exists()}"}


def bad_value(override: str):
    def case(run: Path) -> dict:
        fresh = run / "fresh"
        out = cli(fresh, "stage=sft", override)
        return {**out, "disk": f"run dir created: {fresh.exists()} (no data generated)"}
    return case


def full_disk(run: Path) -> dict:
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        return {"rc": None, "message": "not measured: unshare -rm (for a small tmpfs) is not allowed here", "disk": ""}
    fresh = run / "fresh"
    base = fresh / "base"
    base.mkdir(parents=True)
    cmd = (f"mount -t tmpfs -o size=300k tmpfs {base} && {sys.executable} -m dg_pipeline stage=base run_dir={fresh} "
           f"{' '.join(SMALL)} > /dev/null; code=$?; echo LISTING; ls -A {base}; exit $code")
    started = time.perf_counter()
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, env=ENV, cwd=REPO)
    return {"rc": proc.returncode, "stderr": proc.stderr, "seconds": round(time.perf_counter() - started, 1),
            "disk": f"base/ on a 300 KiB tmpfs holds: {proc.stdout.split('LISTING')[-1].split() or 'nothing'}"}


def default_sigint() -> None:
    """A terminal's Ctrl-C reaches the command with SIGINT's default action; a harness started in the background
    (`cmd &`) has SIGINT ignored, which its children would inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def ctrl_c(run: Path) -> dict:
    shutil.rmtree(run / "sft")
    args = [a for a in SMALL if not a.startswith(("trainer.max_steps", "trainer.val_check_interval"))]
    err_path = run / "ctrl_c.stderr"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "dg_pipeline", f"run_dir={run}", *args, "stage=sft",
                                 "trainer.max_steps=100000", "trainer.val_check_interval=100000"],
                                stdout=subprocess.DEVNULL, stderr=err, text=True, env=ENV, cwd=REPO,
                                preexec_fn=default_sigint)
        deadline = time.time() + 600
        while not (run / "sft" / "exp").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(5)  # into the training steps
        sent = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return {"rc": "no exit in 300 s", "stderr": err_path.read_text()[-600:], "disk": ""}
    return {"rc": proc.returncode, "stderr": err_path.read_text(), "seconds": round(time.perf_counter() - sent, 1),
            "disk": f"sft/model exists: {(run / 'sft' / 'model').exists()}; temp files: "
                    f"{len(list(run.rglob('.*.tmp')))}"}


def jsonl_column(run: Path) -> dict:
    bad = run / "bad.jsonl"
    good = '{"puzzle": "0001003020001003", "solution": "3241413223141423"}'
    bad.write_text(good + "\n" + good.replace(', "solution"', ' "solution"') + "\n")
    out = cli(run, "stage=eval", f"data.eval_path={bad}")
    return {**out, "disk": f"eval/ written: {(run / 'eval').exists()}"}


def two_writers(run: Path) -> dict:
    procs = [subprocess.Popen([sys.executable, "-m", "dg_pipeline", f"run_dir={run}", *SMALL, "stage=eval"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
             for _ in range(2)]
    results = [(p.wait(timeout=900), p.stderr.read()) for p in procs]
    refused = next((err for rc, err in results if rc != 0), "")
    return {"rc": [rc for rc, _ in results], "stderr": refused,
            "disk": f"eval/verify.json passed: {json.loads((run / 'eval' / 'verify.json').read_text())['passed']}"}


CASES = {
    "nan_training": ("trainer.lr=1e12: 'train loss nan', gate PASS, exit 0; 41/67 tensors non-finite; bare NaN in "
                     "training.json / verify.json", nan_training),
    "failed_overwrite": ("export.overwrite=true with a failing gate renames the new bundle over the old one, then "
                         "raises naming a temp path that no longer exists", failed_overwrite),
    "skip_without_gate": ("stage=sft skips whenever sft/model exists, no verify.json ever written",
                          skip_without_gate),
    "empty_eval_file": ("an empty eval file is found only after a full training run (121 s), after the model was "
                        "saved", empty_eval_file),
    "killed_export": ("SIGKILL during export leaves export/.fp8.<random>.tmp/; stage=check reports it PASS; never "
                      "removed", killed_export),
    "manifest_deleted": ("a bundle with manifest.json deleted passes stage=check with a note", manifest_deleted),
    "swapped_tokenizer": ("a tokenizer of the model's vocab size with two digit ids swapped is accepted, the gate "
                          "passes", swapped_tokenizer),
    "truncated_weights": ("truncated model.safetensors: SafetensorError traceback, the file never named",
                          truncated_weights),
    "max_steps_abc": ("trainer.max_steps=abc: ValueError traceback after the data was generated",
                      bad_value("trainer.max_steps=abc")),
    "lr_fast": ("trainer.lr=fast: ValueError traceback after the data was generated", bad_value("trainer.lr=fast")),
    "max_step_typo": ("trainer.max_step=5 does not suggest max_steps", bad_value("trainer.max_step=5")),
    "full_disk": ("a full disk: raw OSError traceback", full_disk),
    "ctrl_c": ("Ctrl-C: raw traceback", ctrl_c),
    "jsonl_column": ("JSONL errors name column 1 whatever the column", jsonl_column),
    "two_writers": ("two processes on one run dir overwrite each other's verify.json silently", two_writers),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, help="a finished small run dir to copy (default: build one)")
    parser.add_argument("--only", nargs="*", choices=list(CASES), help="run only these cases")
    args = parser.parse_args(argv)
    console = Console(width=250)
    work = Path(tempfile.mkdtemp(prefix="crash_cases."))
    source = args.run_dir
    if source is None:
        source = work / "source"
        console.print(f"building a small run dir in {source} (base, sft, quantize fp8, export fp8)")
        build_run(source)
    rows = []
    for name in args.only or CASES:
        before, case = CASES[name]
        run = work / name
        shutil.copytree(source, run, symlinks=True)
        console.print(f"[bold]{name}[/] ...")
        result = case(run)
        result.setdefault("message", message(result.get("stderr", "")))
        rows.append({"case": name, "before": before, "rc": result.get("rc"), "message": result["message"],
                     "disk": result.get("disk", ""), "seconds": result.get("seconds")})
    table = Table(title=f"issue 12 cases, after (host {socket.gethostname()}, {time.strftime('%Y-%m-%d %H:%M')})",
                  show_lines=True)
    for column in ("case", "before", "exit", "message", "on disk", "s"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(r["case"], r["before"], str(r["rc"]), r["message"], r["disk"], str(r["seconds"]))
    console.print(table)
    if args.only and RESULTS.is_file():  # a partial rerun replaces its cases in the last full table
        done = {r["case"] for r in rows}
        kept = [r for r in json.loads(RESULTS.read_text())["cases"] if r["case"] not in done]
        rows = sorted(kept + rows, key=lambda r: list(CASES).index(r["case"]))
    atomic_write_json(RESULTS, {"host": socket.gethostname(), "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                "source_run_dir": str(source), "cases": rows})
    console.print(f"written {RESULTS}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
