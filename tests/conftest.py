"""Suite-wide settings: hermetic (offline, no telemetry) and sized for 2 CPU cores."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from helpers import compose  # noqa: E402


@pytest.fixture
def compose_cfg():
    """compose_cfg(*overrides) -> the DictConfig `python -m dg_pipeline <overrides>` would run with."""
    return compose
