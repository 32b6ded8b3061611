"""Suite-wide settings: hermetic (offline, no telemetry) and sized for 2 CPU cores."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from helpers import compose, gate_settings  # noqa: E402


@pytest.fixture
def compose_cfg():
    """compose_cfg(*overrides) -> the DictConfig `python -m dg_pipeline <overrides>` would run with."""
    return compose


@pytest.fixture(name="gate_settings")
def gate_settings_fixture():
    """gate_settings(*overrides, own_allowance=None) -> the GateSettings of that run (see helpers.gate_settings)."""
    return gate_settings


@pytest.fixture(scope="session")
def parity(tmp_path_factory):
    """The figures of one torchrun launch of tests/dist_parity.py on 2 gloo processes (shared by the test modules
    that check them: one launch for every 2-rank training assertion)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("parity") / "parity.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(root / "tests" / "dist_parity.py"), str(out)]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads(out.read_text())
