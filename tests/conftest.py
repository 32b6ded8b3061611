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
