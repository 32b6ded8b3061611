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
Only a bundle whose gate passed is published (export.overwrite=true swaps it in for the old one in one rename); one that
failed its gate is kept at <run_dir>/export/<name>.failed/ for reading, the old bundle untouched, and GateFailed names it.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from dg_pipeline.core import GateFailed, InputError, RunDir, atomic_dir, atomic_write_text, read_json
from dg_pipeline.core.io import REJECTED, gate_records
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
from dg_pipeline.data import load_eval_examples
from dg_pipeline.model.io import load_model, resolve_device, resolve_dtype, stop_token_ids
from dg_pipeline.model.structure import parameter_counts
from dg_pipeline.quant import QUANT_JSON, read_quant_record, restore_quantized
from dg_pipeline.settings import DataSettings, ObjectiveSettings, RunSettings
from dg_pipeline.verify import GateSettings, gate_record_beside, gate_reference, read_gate_record, run_gate
from dg_pipeline.verify.record import check_from_dict
from dg_pipeline.verify.report import stage_label

STAGE = "export"
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
    settings = RunSettings.from_cfg(cfg)
    default = rd.output("quantize", settings.quant.name)
    if not settings.input and not default.exists():
        raise InputError(f"stage=export needs {default}, which does not exist: run `stage=quantize "
                         f"quant={settings.quant.name} run_dir={rd.root}` first, or pass input=<quantize dir>")
    return rd.resolve_input(STAGE, settings.input, default=default)


def export_name(cfg: DictConfig, rd: RunDir) -> str:
    """export.name, else the quantize dir's name for hf (nvfp4, nvfp4-text, ...: what was quantized, not which
    quant= group happens to be composed), else bf16."""
    export = RunSettings.from_cfg(cfg).export
    if export.name:
        return export.name
    return quantize_input(cfg, rd).name if export.format == "hf" else "bf16"


def run(cfg: DictConfig) -> dict:
    settings = RunSettings.from_cfg(cfg)
    gate_settings = GateSettings.for_run(settings, own_allowance="export")  # the reload-parity allowance
    rd = RunDir.from_cfg(cfg)
    fmt = settings.export.format
    name = export_name(cfg, rd)
    target = rd.output(STAGE, name)
    overwrite = settings.export.overwrite
    if target.exists() and not overwrite:
        raise InputError(f"{target} already exists; pass export.overwrite=true to replace it (or export.name=<other>)")
    dtype = resolve_dtype(settings.export.dtype, key="export.dtype")
    device = resolve_device(settings.device)
    started = time.perf_counter()

    source = load_source(cfg, rd, gate_settings, device)
    # Before the export: a data problem fails fast.
    examples = load_eval_examples(settings.data, source.tokenizer, rd, settings.seed, limit=gate_settings.n_eval,
                                  eos_token_ids=stop_token_ids(source.model))
    generation_config = release_generation_config(source.model, source.tokenizer, settings.sampler)
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
                reloaded.model, reloaded.tokenizer, examples, gate_settings, STAGE, source.input_dir, tmp,
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
        facts = card_facts(settings, rd, name, tmp, source, parameters, str(dtype).removeprefix("torch."))
        atomic_write_text(tmp / "README.md", render_model_card(facts))
        write_manifest(tmp)
        make_world_readable(tmp)
        if gate_failure is not None:  # never published: kept beside the target for reading, the target untouched
            raise keep_rejected(tmp, target, gate)
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
    return summary


def rejected_dir(target: Path) -> Path:
    """Where a bundle that failed its gate is kept: <target>.failed, beside the target (never listed as a release)."""
    return target.with_name(f"{target.name}{REJECTED}")


def keep_rejected(tmp: Path, target: Path, gate: dict) -> GateFailed:
    """Move a finished bundle whose gate failed to <target>.failed (replacing an older rejected one) and return the
    error that names it; `target` is not touched."""
    rejected = rejected_dir(target)
    if rejected.exists():
        shutil.rmtree(rejected)
    os.replace(tmp, rejected)
    failed = "; ".join(check_from_dict(c).describe() for c in gate["checks"] if not c["passed"])
    now = f"{target} is unchanged" if target.exists() else f"nothing was published at {target}"
    return GateFailed(f"stage=export: the new bundle failed its gate ({failed}); {now}. The rejected bundle is kept "
                      f"at {rejected} (record: {rejected / 'verify.json'})")


# ------------------------------------------------------------------------------------------------- the input


def load_source(cfg: DictConfig, rd: RunDir, gate_settings: GateSettings, device: str) -> ExportSource:
    settings = RunSettings.from_cfg(cfg)
    if settings.export.format == "hf":
        input_dir = quantize_input(cfg, rd)
        if not (input_dir / QUANT_JSON).exists():
            raise InputError(f"input={input_dir}: not a quantize output (no {QUANT_JSON}); export.format=hf exports "
                             "a quantized model: pass a <run_dir>/quantize/<quant> dir, or export.format=bf16 for "
                             "a model dir")
        reference = gate_reference(gate_settings, STAGE, input_dir, read_gate_record(input_dir / "verify.json"))
        with console.status(f"export: restoring the ModelOpt state of {input_dir}"):
            model, tokenizer, record = restore_quantized(input_dir, device=device)
        if reference is not None and not reference.get("passed", True):
            console.print(f"[yellow]warning[/]: {reference['path']} records a FAILED quantize gate; exporting anyway "
                          "(the export's own gate compares with that accuracy)")
        return ExportSource(model, tokenizer, input_dir, record, Path(record["base_model_dir"]), reference)

    input_dir = rd.resolve_input(STAGE, settings.input, default=rd.output("sft"))
    model_dir = input_dir
    if (input_dir / QUANT_JSON).exists():  # the unquantized release of a quantize output's base model
        model_dir = Path(read_quant_record(input_dir)["base_model_dir"])
    reference = gate_reference(gate_settings, STAGE, model_dir, gate_record_beside(model_dir))
    with console.status(f"export: loading {model_dir}"):
        model, tokenizer = load_model(model_dir, dtype="float32", device=device)
    return ExportSource(model, tokenizer, input_dir, None, model_dir, reference)


# ------------------------------------------------------------------------------------------------ model card


def card_facts(settings: RunSettings, rd: RunDir, name: str, bundle: Path, source: ExportSource, parameters: int,
               dtype: str) -> ModelCardFacts:
    records = {}
    for path in gate_records(rd.root, "*/verify.json") + gate_records(rd.root, "*/*/verify.json"):
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
        base=_base_description(settings, rd),
        recipe=_recipe_name(),
        data=_data_description(settings.data),
        objective=_objective_description(settings.objective),
        canvas_length=int(config["canvas_length"]),
        vocab_size=int(config["text_config"]["vocab_size"]),
        parameters=parameters,
        quant_details=details,
        verify_records=records,
        dtype=dtype,
    )


def _base_description(settings: RunSettings, rd: RunDir) -> str:
    path = rd.verify_json("base")
    source = read_json(path).get("source") if path.is_file() else None
    source = source or {"base": settings.model.base, "init": settings.model.init}
    if source.get("base"):
        return f"`{source['base']}`"
    return f"random init of the `{source.get('init')}` shape (dg_pipeline.model.configs)"


def _recipe_name() -> str:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.choices.get("recipe", "-"))
    return "-"


def _data_description(d: DataSettings) -> str:
    if d.kind == "sudoku":
        source = d.train_path or f"{d.n_train} generated boards ({d.min_clues}-{d.max_clues} clues)"
        return f"Sudoku {d.size}x{d.size}: {source}; eval {d.eval_path or 'generated'}"
    return f"chat JSONL `{d.train_path}`"


def _objective_description(o: ObjectiveSettings) -> str:
    return f"{o.name}, encoder AR loss x{o.ar_loss_weight}, self-conditioning p={o.self_conditioning_prob}"


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

