"""Stage `plan`: the memory one device needs for `stage=sft` with this config, without training.

The model is built on the meta device (model.base's config.json, or the model.init shape), frozen as training
freezes it, and costed with the sharding plan training uses (dg_pipeline.training.memory_plan)
  -> <run_dir>/plan/plan.json   parameter counts, per-device bytes (parameters, gradients, optimizer, gathered
                                units, activations + formula, transient), peak_bytes_per_device, fits
e.g. python -m dg_pipeline stage=plan model=diffusiongemma_26b_a4b trainer=gpu trainer.strategy=fsdp \
     trainer.devices=8 trainer.batch_size=1 plan.prompt_length=2048 plan.response_length=2048
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from dg_pipeline.core import InputError, RunDir, atomic_write_json
from dg_pipeline.model.configs import build_config
from dg_pipeline.model.inspect import inspect_checkpoint
from dg_pipeline.model.sharded_io import config_of, meta_model
from dg_pipeline.training.memory_plan import PlanSettings, Workload, plan_memory
from dg_pipeline.training.module import freeze_router, freeze_vision
from dg_pipeline.training.sharding import ParallelSettings
from dg_pipeline.training.trainer import resolve_accelerator

STAGE = "plan"
PLAN_JSON = "plan.json"

console = Console()


def run(cfg: DictConfig) -> dict:
    parallel = ParallelSettings.from_trainer_cfg(cfg.trainer)
    settings = PlanSettings.from_cfg(cfg.get("plan"))
    model = planned_model(cfg)
    if bool(cfg.objective.get("freeze_router", True)):
        freeze_router(model)
    freeze_vision(model)
    prompt, response = example_lengths(cfg, settings)
    work = Workload(batch=int(cfg.trainer.batch_size), prompt=prompt, response=response,
                    canvas=int(model.config.canvas_length))
    # AdamW steps every tensor at once (foreach) on GPUs: its temporaries are the size of the trainable shard.
    on_gpu = resolve_accelerator(cfg.trainer, cfg.get("device")) in ("gpu", "cuda")
    record = plan_memory(model, parallel, parallel.world_size(), work, settings, foreach_optimizer=on_gpu)
    out = RunDir.from_cfg(cfg).stage(STAGE) / PLAN_JSON
    atomic_write_json(out, record)
    print_plan(record, out)
    return record


def planned_model(cfg: DictConfig):
    """The model `stage=sft` would train, on the meta device: model.base's config, else the model.init shape."""
    model_cfg = cfg.model
    if model_cfg.get("base"):
        info = inspect_checkpoint(model_cfg.base)
        if not info.is_diffusion_gemma:
            raise InputError(f"model.base={model_cfg.base}: stage=plan reads a DiffusionGemma config.json; convert the "
                             f"Gemma 4 checkpoint first (stage=base) and plan from its output with model.base=")
        config = config_of(info.path)
        if model_cfg.get("canvas_length"):
            config.canvas_length = int(model_cfg.canvas_length)
        return meta_model(config)
    name = str(model_cfg.init)
    vocab = model_cfg.get("vocab_size")
    if not vocab:
        from dg_pipeline.data.tokenizer import build_board_tokenizer

        vocab = len(build_board_tokenizer())
    return meta_model(build_config(name, int(vocab), int(model_cfg.canvas_length)))


def example_lengths(cfg: DictConfig, settings: PlanSettings) -> tuple[int, int]:
    """(prompt, response) tokens per example: plan.* when set, else what the data recipe produces."""
    prompt, response = settings.prompt_length, settings.response_length
    if prompt is not None and response is not None:
        return prompt, response
    if str(cfg.data.get("kind", "sudoku")) == "sudoku" and cfg.data.get("size"):
        cells = int(cfg.data.size) ** 2
        return prompt or cells + 2, response or cells + 1  # <bos> board <sep> / solution <eos>
    raise InputError("stage=plan needs the example lengths of this data: pass plan.prompt_length=<tokens> and "
                     "plan.response_length=<tokens>")


def print_plan(record: dict, out: Path) -> None:
    layout, figures = record["layout"], record["bytes_per_device"]
    table = Table(title=f"plan: {layout['strategy']} on {layout['ranks']} rank(s), expert parallel "
                        f"{layout['expert_parallel']}, activation checkpointing {layout['activation_checkpointing']}, "
                        f"{record['workload']['tokens_per_device']} tokens per device")
    table.add_column("per device")
    table.add_column("GB", justify="right")
    for key, value in figures.items():
        table.add_row(key, f"{value / 1e9:.2f}")
    verdict = "[green]fits[/]" if record["fits"] else "[red]does not fit[/]"
    table.add_row("[bold]peak[/]", f"[bold]{record['peak_gb_per_device']:.2f}[/]")
    console.print(table)
    console.print(f"{record['model']['total_parameters']:,} parameters ({record['model']['expert_parameters']:,} in "
                  f"experts); peak {record['peak_gb_per_device']:.2f} GB of {record['device_memory_gb']} GB: "
                  f"{verdict}; written to {out}")
