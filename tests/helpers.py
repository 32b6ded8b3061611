"""Helpers shared by the stage tests: a composed config, and the gate record a stage leaves beside its model."""

from __future__ import annotations

from pathlib import Path



def compose(*overrides: str):
    """The DictConfig `python -m dg_pipeline <overrides>` would run with, with Hydra's record of the run (its
    overrides, HydraConfig) set as the entry point sets it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from dg_pipeline.settings import CONF_DIR  # importing it registers the config schema

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def gate_settings(*overrides: str, own_allowance: str | None = None):
    """The GateSettings a stage hands its gate, for the run `python -m dg_pipeline <overrides>`."""
    from dg_pipeline.settings import RunSettings
    from dg_pipeline.verify import GateSettings

    return GateSettings.for_run(RunSettings.from_cfg(compose(*overrides)), own_allowance)


def write_sft_gate(model_dir: Path, *overrides: str) -> dict:
    """Run the real verification gate on <model_dir> as stage=sft does: <model_dir>/../verify.json, the record the
    quantize and export gates measure their accuracy drop against. `overrides` size it (eval boards, steps)."""
    from dg_pipeline.core import RunDir
    from dg_pipeline.data import load_eval_examples
    from dg_pipeline.model import load_model
    from dg_pipeline.model.io import stop_token_ids
    from dg_pipeline.settings import RunSettings
    from dg_pipeline.verify import GateSettings, run_gate

    model_dir = Path(model_dir)
    cfg = compose(f"run_dir={model_dir.parent.parent}", "device=cpu", "logger=none", *overrides)
    settings = RunSettings.from_cfg(cfg)
    gate = GateSettings.for_run(settings)
    model, tokenizer = load_model(model_dir)
    examples = load_eval_examples(settings.data, tokenizer, RunDir.from_cfg(cfg), settings.seed, limit=gate.n_eval,
                                  eos_token_ids=stop_token_ids(model))
    return run_gate(model, tokenizer, examples, gate, "sft", model_dir, model_dir.parent)


def free_port() -> int:
    """A TCP port free on localhost now (for a torchrun rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def board_examples(n: int):
    """n learnable tiny examples: prompt <bos> four digits <sep>; response the digits shifted by one, then EOS."""
    import torch

    from dg_pipeline.data.examples import Example

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        digits = torch.randint(6, 16, (4,), generator=g).tolist()
        out.append(Example([2, *digits, 5], [(d - 6 + 1) % 10 + 6 for d in digits] + [1], {}))
    return out
