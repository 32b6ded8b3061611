"""Run under torchrun with 2 processes (tests/test_training_distributed.py does): one real Lightning training step
of the tiny DiffusionGemma per layout (FSDP2, FSDP2 + activation checkpointing, FSDP2 + expert parallel, DDP) on a
global batch of 4 (2 per rank), against the same step on one process at batch 4; then the FSDP2 model gathered to
rank 0 and its sharded (DCP) checkpoint read back on one process; and the measured memory peak of rank 0 in one
FSDP2 step (bench.memory_plan). Writes the figures to the JSON file named by argv[1] (rank 0)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from helpers import board_examples

from dg_pipeline.data.collate import collate
from dg_pipeline.data.tokenizer import build_board_tokenizer
from dg_pipeline.model import build_config
from dg_pipeline.model.sharded_io import gather_model
from dg_pipeline.objective import NoiseKey, UniformObjective
from dg_pipeline.training.module import BlockDiffusionModule, OptimConfig, freeze_router, freeze_vision
from dg_pipeline.settings import TrainerSettings
from dg_pipeline.training.trainer import make_loaders, resolve_strategy

CANVAS = 8
PER_RANK_BATCH = 2
LAYOUTS = {
    "fsdp": dict(strategy="fsdp"),
    "fsdp_activation_checkpointing": dict(strategy="fsdp", activation_checkpointing=True),
    "fsdp_expert_parallel": dict(strategy="fsdp", expert_parallel=2),
    "ddp": dict(strategy="ddp"),
}


def tiny_model():
    from transformers import DiffusionGemmaForBlockDiffusion

    tok = build_board_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DiffusionGemmaForBlockDiffusion(build_config("tiny", len(tok), CANVAS))
    freeze_router(model)
    freeze_vision(model)
    return model, tok


def examples(n=16):
    return board_examples(n)


class Capture(pl.Callback):
    """The full (gathered) gradient of every parameter before the optimizer step, kept on rank 0."""

    def __init__(self):
        self.grads = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        from torch.distributed.tensor import DTensor

        for name, p in pl_module.model.named_parameters():
            if p.grad is None:
                continue
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            if trainer.is_global_zero:
                self.grads[name] = g.detach().clone()


def one_step(layout: dict, workdir: Path):
    model, tok = tiny_model()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer_settings = TrainerSettings(batch_size=PER_RANK_BATCH, num_workers=0, devices=2, **layout)
    # warmup 1 of 1 step: the step's learning rate is 0, so the weights after it are the initial ones.
    module = BlockDiffusionModule(model, UniformObjective(), OptimConfig(lr=1e-3, max_steps=1, warmup_steps=1),
                                  seed=0, parallel=trainer_settings.parallel)
    loader, _ = make_loaders(examples(), [], trainer_settings, CANVAS, tok.pad_token_id, seed=0)
    capture = Capture()
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=2, strategy=resolve_strategy(trainer_settings, False),
                         precision="32-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                         callbacks=[capture], default_root_dir=str(workdir))
    trainer.fit(module, train_dataloaders=loader)
    loss = float(trainer.callback_metrics["train/loss"])
    extra = {}
    if layout["strategy"] == "fsdp":
        gathered = gather_model(module.model, torch.float32, is_rank_zero=trainer.is_global_zero)
        checkpoint = workdir / f"{len(os.listdir(workdir))}.ckpt"
        trainer.save_checkpoint(checkpoint)
        dist.barrier()
        if trainer.is_global_zero:
            extra["gathered_max_abs_diff"] = max_diff(gathered.state_dict(), initial)
            extra["dcp_one_process_max_abs_diff"] = dcp_on_one_process(checkpoint, initial)
    return loss, capture.grads, extra


def max_diff(a: dict, b: dict) -> float:
    keys = set(a) & set(b)
    assert keys, "no common tensors"
    return max((a[k].float() - b[k].float()).abs().max().item() for k in keys)


def dcp_on_one_process(checkpoint: Path, initial: dict) -> float:
    """Read the 2-rank DCP checkpoint's model tensors on this one process (resharding 2 -> 1)."""
    import torch.distributed.checkpoint as dcp

    prefix = "network.model."
    stored = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    wanted = {k: torch.empty_like(initial[k[len("state_dict." + prefix):]])
              for k in stored if k.startswith("state_dict." + prefix) and k[len("state_dict." + prefix):] in initial}
    state = {"state_dict": {k[len("state_dict."):]: v for k, v in wanted.items()}}
    dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    loaded = {k[len(prefix):]: v for k, v in state["state_dict"].items()}
    return max_diff(loaded, initial)


def reference():
    """The same step on one process: the global batch (1 rank x 4) with the same keyed noise."""
    from dg_pipeline.data.order import GlobalBatchSampler

    model, tok = tiny_model()
    data = examples()
    order = GlobalBatchSampler(len(data), PER_RANK_BATCH * 2, seed=0, shuffle=True, drop_last=True)
    keys = list(order.rank_keys(0, 0, 1))[: PER_RANK_BATCH * 2]
    batch = collate([data[i] for _, i in keys], CANVAS, tok.pad_token_id, keys=keys)
    out = UniformObjective().loss(model, batch, NoiseKey(0))
    out.loss.backward()
    return float(out.loss), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def main(out_path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from bench.memory_plan import CASES, measure

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # The measured peak of one FSDP2 step of the same tiny model and global batch, for the planner's check.
    peak = measure(CASES["tiny"], init_device_mesh("cpu", (dist.get_world_size(),)))
    results = {"fsdp_measured_peak_bytes": peak}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if rank == 0:
            ref_loss, ref_grads = reference()
        dist.barrier()
        for name, layout in LAYOUTS.items():
            loss, grads, extra = one_step(layout, workdir)
            if rank == 0:
                missing = sorted(set(ref_grads) ^ set(grads))
                results[name] = {
                    "loss": loss,
                    "reference_loss": ref_loss,
                    "loss_abs_diff": abs(loss - ref_loss),
                    "grad_max_abs_diff": max((grads[k] - ref_grads[k]).abs().max().item()
                                             for k in set(grads) & set(ref_grads)),
                    "grad_max_abs": max(g.abs().max().item() for g in ref_grads.values()),
                    "params_with_grads": len(grads),
                    "grad_names_differ": missing,
                    **extra,
                }
            dist.barrier()
    if rank == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
