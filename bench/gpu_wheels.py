"""The wheels bench/gpu.sh carries to the GPU device (which has no network): every distribution the GPU script
imports that the device image lacks, or has at a version our pins exclude.

    python -m bench.gpu_wheels check              # which imported distributions are neither on the device nor carried
    python -m bench.gpu_wheels download [--dest .whl]   # fetch bench/gpu/wheels.txt as py3.12 manylinux wheels

`check` imports the modules the GPU script runs (the CLI and its stages, NeMo's exp_manager, ModelOpt, the benches),
maps them to their distributions, and compares with bench/gpu/device_packages.txt (the device image's package
list) and bench/gpu/wheels.txt (what gpu.sh installs with `pip install --no-index --no-deps --target`).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
from pathlib import Path

GPU_DIR = Path(__file__).resolve().parent / "gpu"
DEVICE_PACKAGES = GPU_DIR / "device_packages.txt"
WHEELS = GPU_DIR / "wheels.txt"
# What the GPU script runs (python -m dg_pipeline stages, the benches it calls).
GPU_ENTRY_MODULES = (
    "dg_pipeline.__main__", "dg_pipeline.stages.base", "dg_pipeline.stages.sft", "dg_pipeline.stages.quantize",
    "dg_pipeline.training.trainer", "nemo.utils.exp_manager", "nemo.collections.common.callbacks",
    "modelopt.torch.quantization", "modelopt.torch.export", "bench.sampler", "bench.quant_error", "bench.gpu_report",
)
# Distributions the device has but at versions our pins exclude (pyproject: transformers>=5.14,<5.15, which needs
# tokenizers<=0.23.0); carried anyway.
REPINNED = ("transformers", "tokenizers")
PY_VERSION, PLATFORMS = "3.12", ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_names(path: Path) -> dict[str, str | None]:
    """{normalized name: pinned version or None} of a one-per-line list (comments with #)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[normalize(name)] = version or None
    return out


def imported_distributions(modules=GPU_ENTRY_MODULES) -> dict[str, str]:
    """{normalized distribution: installed version} of every top-level module loaded by importing `modules`, in a
    fresh interpreter (so nothing the caller already imported, pytest say, is counted)."""
    code = (
        "import importlib, importlib.metadata as md, json, sys\n"
        f"for m in {list(modules)!r}: importlib.import_module(m)\n"
        "owners = md.packages_distributions()\n"
        "print('DISTRIBUTIONS ' + json.dumps(sorted({d for m in list(sys.modules) for d in owners.get(m.split('.')[0], [])})))\n"
    )
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))})
    names = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("DISTRIBUTIONS "))[14:])
    out = {}
    for dist in names:
        try:
            out[normalize(dist)] = md.version(dist)
        except md.PackageNotFoundError:  # a namespace shared with a distribution of another spelling
            out[normalize(dist)] = "?"
    out.pop("dg-pipeline", None)  # travels as the working tree
    return out


def missing(imported: dict[str, str], device: set[str], carried: set[str]) -> list[str]:
    """Imported distributions neither on the device (nor re-pinned) nor carried."""
    return sorted(d for d in imported if (d not in device or d in REPINNED) and d not in carried)


def download(dest: Path) -> None:
    """pip download every wheels.txt pin for the device (py3.12, manylinux x86-64); an sdist-only pin is built here
    into a wheel (pure Python)."""
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    for name, version in read_names(WHEELS).items():
        spec = f"{name}=={version}"
        fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                  "--python-version", PY_VERSION, "--implementation", "cp", *platforms, "-d",
                                  str(dest), spec], capture_output=True, text=True)
        if fetched.returncode != 0:
            subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dest), spec], check=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("check", "download"))
    p.add_argument("--dest", type=Path, default=Path(".whl"))
    args = p.parse_args(argv)
    if args.command == "download":
        download(args.dest)
        return 0
    gaps = missing(imported_distributions(), set(read_names(DEVICE_PACKAGES)), set(read_names(WHEELS)))
    print("every imported distribution is on the device or carried" if not gaps else
          "not on the device and not in bench/gpu/wheels.txt: " + ", ".join(gaps))
    return 1 if gaps else 0


if __name__ == "__main__":
    raise SystemExit(main())
