"""Stage `export`: a release bundle vLLM serves -> <run_dir>/export/<name>/.

    python -m dg_pipeline stage=export [input=<quantize dir>] [export.format=hf|bf16] [export.name=<name>]
        [export.overwrite=true] run_dir=<dir>

format=hf    input: a quantize output (default <run_dir>/quantize/<quant.name>/; the bundle takes its dir name, e.g.
             export/nvfp4-text, unless export.name is set): its ModelOpt state restored onto
             the SFT model recorded in quant.json, then ModelOpt's unified HF checkpoint (dg_pipeline.export).
format=bf16  input: an unquantized model dir (default <run_dir>/sft/model; a quantize dir means its base model).
Then, inside a temporary dir that only becomes <run_dir>/export/<name>/ once everything passed:
  1. the loader-rule checker: any violation -> CheckFailed listing all, nothing left at the target;
  2. reload parity: the bundle loaded back in plain torch (weights dequantized) runs the verification gate
     (verify.json, predictions, plots in the bundle) against the input's gate (export.max_accuracy_drop);
  3. README.md (model card: provenance, every stage's gate, sampler defaults, serve commands);
  4. manifest.json (sha256 of every file; verified whenever the pipeline loads the export).
A failed gate still publishes the bundle (it passed the loader rules) and then raises GateFailed.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, open_dict
from rich.console import Console
from rich.table import Table

from dg_pipeline.core import GateFailed, InputError, RunDir, atomic_dir, atomic_write_text, read_json
from dg_pipeline.export import (
    CheckFailed,
    ModelCardFacts,
    check_export,
    describe_export,
    export_quantized,
    export_unquantized,
    load_export,
    release_generation_config,
    render_model_card,
    write_manifest,
)
from dg_pipeline.model.io import load_model, resolve_dtype
from dg_pipeline.model.structure import parameter_counts
from dg_pipeline.quant import QUANT_JSON, read_quant_record, restore_quantized
from dg_pipeline.stages.base import resolve_device
from dg_pipeline.stages.eval import eval_examples, gate_record, provider_record
from dg_pipeline.verify import gate_reference, run_gate
from dg_pipeline.verify.report import stage_label

STAGE = "export"
FORMATS = ("hf", "bf16")
console = Console()


@dataclass
class ExportSource:
    """What the bundle is made from."""

    model: object
    tokenizer: object
    input_dir: Path
    quant_record: dict | None  # quant.json of a quantize input (None: an unquantized model dir)
    model_dir: Path  # the unquantized model dir (the SFT model a quantize output was calibrated on)
    reference: dict | None  # the gate record the reload is compared with


def quantize_input(cfg: DictConfig, rd: RunDir) -> Path:
    """The quantize dir an hf export reads: input=<dir>, else <run_dir>/quantize/<quant.name>."""
    default = rd.stage("quantize") / str(cfg.quant.name)
    if not cfg.get("input") and not default.exists():
        raise InputError(f"stage=export needs {default}, which does not exist: run `stage=quantize "
                         f"quant={cfg.quant.name} run_dir={rd.root}` first, or pass input=<quantize dir>")
    return rd.resolve_input(STAGE, cfg.get("input"), default=default)


def export_name(cfg: DictConfig, rd: RunDir) -> str:
    """export.name, else the quantize dir's name for hf (nvfp4, nvfp4-text, ...: what was quantized, not which
    quant= group happens to be composed), else bf16."""
    e = cfg.export
    if e.get("name"):
        return str(e.name)
    return quantize_input(cfg, rd).name if str(e.format) == "hf" else "bf16"


def run(cfg: DictConfig) -> dict:
    rd = RunDir.from_cfg(cfg)
    fmt = str(cfg.export.format)
    if fmt not in FORMATS:
        raise InputError(f"export.format={fmt}: choose hf (ModelOpt unified checkpoint of a quantize output) or "
                         "bf16 (plain HF weights of an unquantized model)")
    name = export_name(cfg, rd)
    target = rd.stage(STAGE) / name
    overwrite = bool(cfg.export.get("overwrite", False))
    if target.exists() and not overwrite:
        raise InputError(f"{target} already exists; pass export.overwrite=true to replace it (or export.name=<other>)")
    dtype = resolve_dtype(str(cfg.export.get("dtype", "bfloat16")), key="export.dtype")
    device = resolve_device(str(cfg.get("device", "auto")))
    started = time.perf_counter()

    source = load_source(cfg, rd, fmt, device)
    examples = eval_examples(cfg, source.tokenizer, rd)  # before the export: a data problem fails fast
    generation_config = release_generation_config(source.model, source.tokenizer, cfg.sampler)
    parameters = parameter_counts(source.model)["total"]
    console.print(f"[bold]export[/]: {fmt} of {source.input_dir} -> {target} (unquantized tensors in "
                  f"{str(dtype).removeprefix('torch.')})")

    gate_failure: GateFailed | None = None
    with atomic_dir(target, overwrite=overwrite) as tmp:
        with console.status("export: writing the checkpoint"):
            if fmt == "hf":
                result = export_quantized(source.model, source.tokenizer, tmp, generation_config, dtype)
            else:
                result = export_unquantized(source.model, source.tokenizer, tmp, generation_config, dtype)
        source.model = None  # consumed by the writer (ModelOpt replaces the weights in place)
        violations = check_export(tmp)
        if violations:
            raise CheckFailed({target: violations})
        console.print(f"[bold]export[/]: loader rules passed ({describe_export(tmp)['tensors']} tensors)")
        with console.status("export: reloading the bundle in plain torch"):
            reloaded = load_export(tmp, device=device, verify=False)
        try:
            gate = run_gate(
                reloaded.model, reloaded.tokenizer, examples, gate_config(cfg), STAGE, source.input_dir, tmp,
                reference=source.reference, simulated=result.quant_algo is not None,
                extra={
                    "export_format": fmt,
                    "quant_algo": result.quant_algo,
                    "reload": "weights dequantized in plain torch; activations not quantized",
                    "dequantized_linears": reloaded.dequantized_linears,
                    "weight_bytes": describe_export(tmp)["weight_bytes"],
                },
            )
        except GateFailed as e:
            gate_failure, gate = e, read_json(tmp / "verify.json")
        del reloaded
        facts = card_facts(cfg, rd, name, tmp, source, parameters, str(dtype).removeprefix("torch."))
        atomic_write_text(tmp / "README.md", render_model_card(facts))
        write_manifest(tmp)
        make_world_readable(tmp)
    summary = {
        "stage": STAGE,
        "path": str(target),
        "format": fmt,
        "quant_algo": result.quant_algo,
        "input": str(source.input_dir),
        "added_exclusions": result.added_exclusions,
        "accuracy": gate.get("accuracy"),
        "reference_accuracy": (source.reference or {}).get("accuracy"),
        "passed": gate.get("passed"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print_summary(summary, target)
    if gate_failure is not None:
        raise gate_failure
    return summary


# ------------------------------------------------------------------------------------------------- the input


def load_source(cfg: DictConfig, rd: RunDir, fmt: str, device: str) -> ExportSource:
    explicit = cfg.get("input")
    if fmt == "hf":
        input_dir = quantize_input(cfg, rd)
        if not (input_dir / QUANT_JSON).exists():
            raise InputError(f"input={input_dir}: not a quantize output (no {QUANT_JSON}); export.format=hf exports "
                             "a quantized model: pass a <run_dir>/quantize/<quant> dir, or export.format=bf16 for "
                             "a model dir")
        reference = gate_reference(gate_config(cfg), STAGE, input_dir, gate_record(input_dir / "verify.json"))
        with console.status(f"export: restoring the ModelOpt state of {input_dir}"):
            model, tokenizer, record = restore_quantized(input_dir, device=device)
        if reference is not None and not reference.get("passed", True):
            console.print(f"[yellow]warning[/]: {reference['path']} records a FAILED quantize gate; exporting anyway "
                          "(the export's own gate compares with that accuracy)")
        return ExportSource(model, tokenizer, input_dir, record, Path(record["base_model_dir"]), reference)

    input_dir = rd.resolve_input(STAGE, explicit, default=rd.model_dir("sft"))
    model_dir = input_dir
    if (input_dir / QUANT_JSON).exists():  # the unquantized release of a quantize output's base model
        model_dir = Path(read_quant_record(input_dir)["base_model_dir"])
    reference = gate_reference(gate_config(cfg), STAGE, model_dir, provider_record(model_dir))
    with console.status(f"export: loading {model_dir}"):
        model, tokenizer = load_model(model_dir, dtype="float32", device=device)
    return ExportSource(model, tokenizer, input_dir, None, model_dir, reference)


def gate_config(cfg: DictConfig) -> DictConfig:
    """cfg with verify.max_accuracy_drop defaulting to export.max_accuracy_drop (the reload-parity allowance)."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        if out.verify.get("max_accuracy_drop") is None:
            out.verify.max_accuracy_drop = out.export.get("max_accuracy_drop")
    return out


# ------------------------------------------------------------------------------------------------ model card


def card_facts(cfg, rd: RunDir, name: str, bundle: Path, source: ExportSource, parameters: int,
               dtype: str) -> ModelCardFacts:
    records = {}
    for path in sorted(rd.root.glob("*/verify.json")) + sorted(rd.root.glob("*/*/verify.json")):
        if rd.stage(STAGE) not in path.parents:  # other exports are releases of their own
            record = read_json(path)
            records[stage_label(record, path)] = record
    records[f"{STAGE}/{name}"] = read_json(bundle / "verify.json")
    quant = source.quant_record or {}
    details = {}
    if quant:
        cal = quant.get("calibration") or {}
        details["calibration"] = (f"{cal.get('mode', '?')} forward loop, {cal.get('n_samples', '?')} prompts "
                                  f"(max {cal.get('max_length', '?')} tokens)")
        experts = quant.get("experts") or {}
        if experts:
            details["experts calibrated"] = f"{experts.get('covered')}/{experts.get('experts')}"
        if quant.get("logits_relative_error") is not None:
            details["logits rel. error (fake-quant vs unquantized)"] = f"{quant['logits_relative_error']:.4f}"
    config = read_json(bundle / "config.json")
    return ModelCardFacts(
        name=name,
        export_dir=bundle,
        base=_base_description(cfg, rd),
        recipe=_recipe_name(),
        data=_data_description(cfg),
        objective=_objective_description(cfg),
        canvas_length=int(config["canvas_length"]),
        vocab_size=int(config["text_config"]["vocab_size"]),
        parameters=parameters,
        quant_details=details,
        verify_records=records,
        dtype=dtype,
    )


def _base_description(cfg, rd: RunDir) -> str:
    path = rd.verify_json("base")
    source = read_json(path).get("source") if path.is_file() else None
    source = source or {"base": cfg.model.get("base"), "init": cfg.model.get("init")}
    if source.get("base"):
        return f"`{source['base']}`"
    return f"random init of the `{source.get('init')}` shape (dg_pipeline.model.configs)"


def _recipe_name() -> str:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.choices.get("recipe", "-"))
    return "-"


def _data_description(cfg) -> str:
    d = cfg.data
    if str(d.kind) == "sudoku":
        source = d.get("train_path") or f"{d.get('n_train')} generated boards ({d.get('min_clues')}-" \
                                        f"{d.get('max_clues')} clues)"
        return f"Sudoku {d.get('size')}x{d.get('size')}: {source}; eval {d.get('eval_path') or 'generated'}"
    return f"chat JSONL `{d.get('train_path')}`"


def _objective_description(cfg) -> str:
    o = cfg.objective
    parts = [str(o.get("name"))]
    if o.get("ar_loss_weight") is not None:
        parts.append(f"encoder AR loss x{o.get('ar_loss_weight')}")
    if o.get("self_conditioning_prob") is not None:
        parts.append(f"self-conditioning p={o.get('self_conditioning_prob')}")
    return ", ".join(parts)


def make_world_readable(bundle: Path) -> None:
    """Release files are read by a serving user: the atomic writers create 0600 files in a 0700 temp dir."""
    bundle.chmod(0o755)
    for path in bundle.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def print_summary(summary: dict, target: Path) -> None:
    table = Table(title=f"export {summary['format']} -> {target}", show_header=False, title_justify="left")
    table.add_row("quantization", str(summary["quant_algo"] or "none"))
    files = sorted(p for p in target.iterdir() if p.is_file())
    table.add_row("files", ", ".join(f"{p.name} ({p.stat().st_size / 1e6:.2f} MB)" for p in files))
    acc, ref = summary["accuracy"], summary["reference_accuracy"]
    table.add_row("reload accuracy", "-" if acc is None else f"{acc:.3f}"
                  + ("" if ref is None else f"  (input's gate: {ref:.3f})"))
    table.add_row("gate", "PASS" if summary["passed"] else "FAIL")
    console.print(table)

