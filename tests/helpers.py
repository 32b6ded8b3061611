"""Helpers shared by the stage tests: a composed config, and the gate record a stage leaves beside its model."""

from __future__ import annotations

from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def compose(*overrides: str):
    """The DictConfig `python -m dg_pipeline <overrides>` would run with."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return hydra_compose(config_name="config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def write_sft_gate(model_dir: Path, *overrides: str) -> dict:
    """Run the real verification gate on <model_dir> as stage=sft does: <model_dir>/../verify.json, the record the
    quantize and export gates measure their accuracy drop against. `overrides` size it (eval boards, steps)."""
    from dg_pipeline.core import RunDir
    from dg_pipeline.model import load_model
    from dg_pipeline.stages.eval import eval_examples
    from dg_pipeline.verify import run_gate

    model_dir = Path(model_dir)
    cfg = compose(f"run_dir={model_dir.parent.parent}", "device=cpu", "logger=none", *overrides)
    model, tokenizer = load_model(model_dir)
    examples = eval_examples(cfg, tokenizer, RunDir.from_cfg(cfg))
    return run_gate(model, tokenizer, examples, cfg, "sft", model_dir, model_dir.parent)


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
