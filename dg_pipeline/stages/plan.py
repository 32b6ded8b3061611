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
from dg_pipeline.settings import DataSettings, ModelSettings, PlanSettings, RunSettings
from dg_pipeline.training.memory_plan import Workload, plan_memory
from dg_pipeline.training.module import freeze_router, freeze_vision
from dg_pipeline.training.trainer import resolve_accelerator

STAGE = "plan"
PLAN_JSON = "plan.json"

console = Console()


def run(cfg: DictConfig) -> dict:
    settings = RunSettings.from_cfg(cfg)
    parallel = settings.trainer.parallel
    model = planned_model(settings.model)
    if settings.objective.freeze_router:
        freeze_router(model)
    freeze_vision(model)
    prompt, response = example_lengths(settings.data, settings.plan)
    work = Workload(batch=settings.trainer.batch_size, prompt=prompt, response=response,
                    canvas=int(model.config.canvas_length))
    # AdamW steps every tensor at once (foreach) on GPUs: its temporaries are the size of the trainable shard.
    on_gpu = resolve_accelerator(settings.trainer, settings.device) in ("gpu", "cuda")
    record = plan_memory(model, parallel, parallel.world_size(), work, settings.plan, foreach_optimizer=on_gpu)
    out = RunDir.from_cfg(cfg).output(STAGE) / PLAN_JSON
    atomic_write_json(out, record)
    print_plan(record, out)
    return record


def planned_model(model_settings: ModelSettings):
    """The model `stage=sft` would train, on the meta device: model.base's config, else the model.init shape."""
    if model_settings.base:
        info = inspect_checkpoint(model_settings.base)
        if not info.is_diffusion_gemma:
            raise InputError(f"model.base={model_settings.base}: stage=plan reads a DiffusionGemma config.json; "
                             f"convert the Gemma 4 checkpoint first (stage=base) and plan from its output with "
                             f"model.base=")
        config = config_of(info.path)
        if model_settings.canvas_length:
            config.canvas_length = model_settings.canvas_length
        return meta_model(config)
    vocab = model_settings.vocab_size
    if not vocab:
        from dg_pipeline.data.tokenizer import build_board_tokenizer

        vocab = len(build_board_tokenizer())
    return meta_model(build_config(str(model_settings.init), vocab, model_settings.canvas_length))


def example_lengths(data: DataSettings, plan: PlanSettings) -> tuple[int, int]:
    """(prompt, response) tokens per example: plan.* when set, else what the data recipe produces."""
    prompt, response = plan.prompt_length, plan.response_length
    if prompt is not None and response is not None:
        return prompt, response
    if data.kind == "sudoku" and data.size:
        cells = data.size ** 2
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
