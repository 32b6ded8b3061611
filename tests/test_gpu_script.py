"""bench/gpu.sh, the one GPU script: its options and wheel logic, the wheels it carries, and every step it runs
(the same python entry points, at tiny size on CPU: --smoke). No GPU here; the script itself runs on the device."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.sh"


def gpu_sh(*args, env=None, timeout=60):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_the_dry_run_plans_sudoku9_sft_the_compiled_bf16_sampler_fp8_and_nvfp4_within_8_minutes(tmp_path):
    out = gpu_sh("--dry-run", "--out", str(tmp_path), env={"WHEEL_DIR": str(tmp_path / "none")})
    assert out.returncode == 0, out.stderr
    steps = dict(re.findall(r"^== (\w+) \(limit \d+ s\): (.*)$", out.stdout, re.M))
    assert list(steps) == ["base", "sft", "sampler", "quantize_fp8", "nvfp4", "report"]
    assert "recipe=sudoku9" in steps["sft"] and "device=cuda" in steps["sft"] and "trainer.max_steps=1200" in steps["sft"]
    assert "--init bench100m --device cuda --dtype bfloat16 --compile true --batch-sizes 1 8" in steps["sampler"]
    assert "stage=quantize quant=fp8" in steps["quantize_fp8"] and "--compare-cuda" in steps["nvfp4"]
    assert sum(int(s) for s in re.findall(r"\(limit (\d+) s\)", out.stdout)) <= 8 * 60
    assert "wheels" not in out.stdout  # no wheel dir: nothing to install
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_carried_wheels_are_installed_without_network_before_any_step(tmp_path):
    (tmp_path / "whl").mkdir()
    out = gpu_sh("--dry-run", "--sft-steps", "50", env={"WHEEL_DIR": str(tmp_path / "whl")})
    lines = out.stdout.splitlines()
    assert lines[0] == f"== wheels: pip install --no-index --no-deps --target /tmp/site {tmp_path / 'whl'}/*.whl"
    assert "trainer.max_steps=50" in out.stdout
    assert "wheels" not in gpu_sh("--dry-run", "--skip-wheels", env={"WHEEL_DIR": str(tmp_path / "whl")}).stdout


def test_an_unknown_option_is_one_clear_error():
    out = gpu_sh("--steps", "3")
    assert out.returncode == 2 and out.stderr.strip() == "bench/gpu.sh: unknown option --steps (see the header of bench/gpu.sh)"


def test_the_wheels_cover_every_distribution_the_gpu_script_imports():
    from bench.gpu_wheels import DEVICE_PACKAGES, WHEELS, imported_distributions, missing, read_names

    imported = imported_distributions()
    assert {"nemo-toolkit", "nvidia-modelopt", "hydra-core", "transformers"} <= set(imported)
    assert missing(imported, set(read_names(DEVICE_PACKAGES)), set(read_names(WHEELS))) == []
    pins = read_names(WHEELS)
    assert all(version for version in pins.values()), "every carried wheel is pinned"
    assert pins["transformers"] == imported["transformers"]  # the device's 5.17 is replaced by our pin


def test_smoke_runs_every_step_of_the_script_on_cpu_at_tiny_size(tmp_path):
    out = gpu_sh("--smoke", "--out", str(tmp_path), timeout=900)
    assert out.returncode == 0, out.stderr
    log = (tmp_path / "gpu.log").read_text()
    exits = dict(re.findall(r"^   (\w+): exit (\d+) after", log, re.M))
    assert exits == {s: "0" for s in ("base", "sft", "sampler", "quantize_fp8", "nvfp4", "report")}, log[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    values = {r["what"]: r["value"] for r in report["rows"]}
    assert "not finished" not in values.values()
    assert values["NVFP4 CUDA vs CPU emulation"] == "no GPU on this host"
    assert report["sft"]["fixed_step_benchmark"]["max_denoising_steps"] == 2
    assert {r["method"] for r in report["sampler"]["rows"]} == {"ours", "reference", "ar"}
    assert report["fp8"]["quant"] == "fp8" and report["fp8"]["fp8_gemm_linears"] == 0  # no FP8 GEMMs on a CPU
    assert "bench/gpu.sh (cpu)" in out.stdout
