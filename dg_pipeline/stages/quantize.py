"""Stage `quantize`: ModelOpt FP8 / NVFP4 calibration of an SFT model, gated on the task metric.

    python -m dg_pipeline stage=quantize quant=<fp8|nvfp4|nvfp4_experts_only> [quant.kv_cache=none|fp8|fp8_cast]
        [calib.mode=diffusion|text] [input=<sft model dir>] run_dir=<dir>

input=<dir>, else <run_dir>/sft/model
  -> <run_dir>/quantize/<quant>/modelopt_state.pth   mto.save: quantizers + calibrated ranges + weights
                                                     (<quant>-text/ for calib.mode=text, a comparison run)
     <run_dir>/quantize/<quant>/quant.json           format, kv cache, calibration settings and figures, base model
                                                     dir, exclusions, per-expert coverage, logits error vs unquantized
     <run_dir>/quantize/<quant>/.quant_summary.txt   mtq.print_quant_summary: every quantizer and its state
     <run_dir>/quantize/<quant>/verify.json          the gate on the fake-quantized model vs <sft>/verify.json,
                                                     verify.max_accuracy_drop defaulting to quant.max_accuracy_drop,
                                                     the logits error bounded by quant.max_logits_error
Skipped when its outputs exist, passed, and were made with the same settings on the same input (the
fingerprint in quant.json), unless force=true. The gate scores accuracy (diffusion pass, step sweep, drop vs sft,
logits error); it times decoding (AR baseline, batch-1 rounds) only when real-FP8 linears run (quant=fp8 on a CUDA
device with compute capability >= 8.9, quant.fp8_gemm) or verify.time_simulated=true, since fake-quantized speed is
no deployment figure (the export gate times the bundle). It runs after the state is saved, on weights folded once
(`fold_weights_for_eval`: same logits, no per-forward re-rounding).
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from dg_pipeline.core import InputError, RunDir, atomic_dir, atomic_write_json, read_json
from dg_pipeline.core.fingerprint import stage_fingerprint_parts
from dg_pipeline.core.registry import STAGES, decide_reuse
from dg_pipeline.data import load_eval_examples, load_splits
from dg_pipeline.model.io import load_model, resolve_device, stop_token_ids
from dg_pipeline.quant import (
    QUANT_JSON,
    LogitsErrorProbe,
    build_recipe,
    calibrate,
    calibration_examples,
    calibration_forward_loop,
    fold_weights_for_eval,
    fp8_gemm_supported,
    save_quantized,
    swap_in_fp8_gemms,
    uncovered_summary,
)
from dg_pipeline.sampling import SamplerConfig
from dg_pipeline.settings import RunSettings
from dg_pipeline.verify import GateSettings, gate_record_beside, gate_reference, read_gate_record, run_gate
from dg_pipeline.verify.gate import resolve_max_new_tokens
from dg_pipeline.verify.record import at_most

STAGE = "quantize"
console = Console()


def output_name(cfg: DictConfig) -> str:
    """The quantize dir's name: <quant>, or <quant>-<calib mode> for a comparison calibration."""
    settings = RunSettings.from_cfg(cfg)
    return settings.calib.output_name(settings.quant.name)


def run(cfg: DictConfig) -> dict:
    settings = RunSettings.from_cfg(cfg)
    quant, calib = settings.quant, settings.calib
    rd = RunDir.from_cfg(cfg)
    out_dir = rd.output(STAGE, calib.output_name(quant.name))
    input_dir = rd.resolve_input(STAGE, settings.input)
    fingerprint = stage_fingerprint_parts(cfg, STAGE, input_dir)
    previous = _previous_record(out_dir)
    reuse = decide_reuse(STAGES[STAGE].reuse, out_dir, force=settings.force, gate_record=previous and previous["gate"],
                         fingerprint=fingerprint, recorded_fingerprint=previous and previous.get("fingerprint"))
    if reuse.skip:
        console.print(f"[bold]quantize[/]: skipped, {reuse.reason} (force=true re-calibrates)")
        return {**previous, "skipped": True}
    if previous is not None:
        console.print(f"[bold]quantize[/]: re-calibrating: {reuse.reason}")
    gate_settings = GateSettings.for_run(settings, own_allowance="quant")
    reference = gate_reference(gate_settings, STAGE, input_dir, gate_record_beside(input_dir))  # before calibrating
    if gate_settings.thresholds.min_speedup > 0 and not settings.verify.time_simulated:
        raise InputError(f"stage=quantize: verify.min_speedup={gate_settings.thresholds.min_speedup} needs the gate "
                         "to time fake-quantized weights: set verify.time_simulated=true, or put the speed floor on "
                         "the export gate (it times the real bundle)")
    device = resolve_device(settings.device)
    recipe = build_recipe(quant.name, quant.kv_cache, self_conditioning=quant.self_conditioning,
                          extra_exclusions=list(quant.exclude), nvfp4_backend=quant.nvfp4_backend, device=device)

    with console.status(f"quantize: loading {input_dir}"):
        model, tokenizer = load_model(input_dir, dtype=settings.model.dtype, device=device)
    splits = load_splits(settings.data, tokenizer, rd, seed=settings.seed, eos_token_ids=stop_token_ids(model))
    # The gate's examples before calibrating: a missing or empty eval file fails here, not after the work.
    examples = load_eval_examples(settings.data, tokenizer, rd, settings.seed, limit=gate_settings.n_eval,
                                  eos_token_ids=stop_token_ids(model))
    calib_examples = calibration_examples(splits.train, calib.n_samples, calib.max_length)
    probe = LogitsErrorProbe(model, [e.prompt_ids for e in splits.eval[: quant.probe_prompts]], settings.seed)
    console.print(
        f"[bold]quantize[/]: {quant.name} (kv cache {recipe.kv_cache}) of {input_dir} on {device}; "
        f"calib.mode={calib.mode}, {len(calib_examples)} prompts"
        + (f", NVFP4 via backend {recipe.nvfp4_backend}" if recipe.nvfp4_backend else "")
    )

    loop, calib_settings = forward_loop(settings, model, tokenizer, calib_examples)
    result = calibrate(model, recipe, loop)
    error = probe.error(model)
    record = {**quant_record(settings, recipe, input_dir, calib_settings, result, error), "fingerprint": fingerprint}
    print_calibration(record)

    with atomic_dir(out_dir) as tmp:
        save_quantized(model, tmp)
        _write_quant_summary(model, tmp)
        atomic_write_json(tmp / QUANT_JSON, record)

    fp8_linears = gate_with_fp8_gemms(quant.fp8_gemm, model, quant.name, device)
    folded = fold_weights_for_eval(model)  # saved above; the gate's forwards need not re-round the weights
    simulated = True  # fake quantization somewhere (all of it, or the experts next to real-FP8 linears)
    # Fake-quantized speed is no deployment figure: time only real FP8 GEMMs, or when asked (the export gate times the
    # bundle either way).
    timed = bool(fp8_linears) or settings.verify.time_simulated
    if timed:
        console.print(
            "[yellow]note[/]: tokens/s below are a simulation: weights and activations are fake-quantized "
            + (f"(except {len(fp8_linears)} linears running real FP8 GEMMs)" if fp8_linears
               else "(no native FP8/FP4 kernels)")
        )
    else:
        console.print("[bold]quantize[/]: gate scores accuracy only on fake-quantized weights (no AR baseline, no "
                      "timing; verify.time_simulated=true adds them); the export gate times the real bundle")
    gate = run_gate(
        model, tokenizer, examples, gate_settings, STAGE, input_dir, out_dir,
        reference=reference, simulated=simulated, timed=timed,
        extra={
            "quant": quant.name,
            "kv_cache": recipe.kv_cache,
            "calib_mode": calib.mode,
            "logits_relative_error": error["logits_relative_error"],
            "fp8_gemm_linears": len(fp8_linears),
            "folded_weight_quantizers": folded,
            "simulation_note": "throughput of fake-quantized weights/activations; not a deployment figure",
            "fingerprint": fingerprint,
        },
        checks=logits_error_checks(error, quant.max_logits_error),
    )
    return {**record, "gate": gate}


def logits_error_checks(error: dict, bound: float | None) -> list:
    """The logits relative error vs the unquantized model, bounded by quant.max_logits_error (none when null)."""
    return [] if bound is None else [at_most("max_logits_error", error["logits_relative_error"], bound)]


def forward_loop(settings: RunSettings, model, tokenizer, examples: list):
    """The calibration loop of the run's calib group, sampling as the run's gate does (same sampler settings, so a
    masked model calibrates on <mask> canvases), and the settings it runs with."""
    calib = settings.calib
    sampler_config = SamplerConfig.for_model(model, settings.sampler, tokenizer)
    max_new = calib.max_new_tokens or resolve_max_new_tokens(settings.sampler.max_new_tokens, settings.data.kind,
                                                              examples)
    seed = calib.seed if calib.seed is not None else settings.seed
    return calibration_forward_loop(calib, model, tokenizer, examples, sampler_config, max_new, seed, console)


def quant_record(settings: RunSettings, recipe, input_dir: Path, calib_settings: dict, result, error: dict) -> dict:
    """quant.json: what was quantized how, from which model, and what calibration measured."""
    return {
        "stage": STAGE,
        "format": recipe.name,
        "kv_cache": recipe.kv_cache,
        "source": recipe.source,
        "nvfp4_backend": recipe.nvfp4_backend,
        "base_model_dir": str(input_dir),
        "dtype": settings.model.dtype,
        "exclusions": recipe.exclusions,
        "excluded_modules": result.excluded_modules,
        "self_conditioning_quantized": recipe.self_conditioning,
        "calibration": {**calib_settings, "seconds": round(result.seconds, 3), "passes": result.passes},
        "calibration_seconds": round(result.seconds, 3),
        "quantizers": result.quantizers,
        "experts": result.experts,
        "tied": result.tied,
        "fused": result.fused,
        "logits_error": error,
        "logits_relative_error": error["logits_relative_error"],
        "max_accuracy_drop": settings.quant.max_accuracy_drop,
        "max_logits_error": settings.quant.max_logits_error,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def gate_with_fp8_gemms(choice: str, model, name: str, device: str) -> list[str]:
    """quant=fp8 on Hopper+ (quant.fp8_gemm=auto): swap the FP8-quantized linears for real FP8 GEMMs before the
    gate (after saving)."""
    if name != "fp8" or choice == "false" or not fp8_gemm_supported(device):
        return []
    return swap_in_fp8_gemms(model, use_scaled_mm=True)


def print_calibration(record: dict) -> None:
    cal, experts, err = record["calibration"], record["experts"], record["logits_error"]
    table = Table(title=f"quantize {record['format']} (kv cache {record['kv_cache']})", show_header=False)
    table.add_row("calibration", f"{cal['mode']}, {cal['n_samples']} prompts, {cal['seconds']:.1f} s")
    p = cal["passes"]
    table.add_row("passes", f"encoder {p['encoder_passes']} ({p['encoder_tokens']} tok), decoder {p['decoder_passes']} "
                  f"({p['decoder_tokens']} tok), self-conditioned {p['self_conditioned_passes']}")
    q = record["quantizers"]
    table.add_row("quantizers", f"{q['enabled']} enabled ({q['calibrated']} calibrated, {q['constant_amax']} constant, "
                  f"{q['dynamic']} dynamic), {q['disabled']} disabled")
    table.add_row("experts", f"{experts['covered']}/{experts['experts']} saw calibration tokens")
    table.add_row("tied enc/dec", f"{record['tied'].get('synced', 0)} quantizer pairs set to max(encoder, decoder); "
                  f"largest stream gap {record['tied'].get('max_stream_gap', 0.0):.1%}")
    table.add_row("logits rel. error", f"{err['logits_relative_error']:.4f} (first step {err['first_step']:.4f}, "
                  f"self-conditioned {err['self_conditioned_step']:.4f})")
    console.print(table)
    if experts["uncovered"]:
        console.print(f"[yellow]warning[/]: {len(experts['uncovered'])} expert(s) saw no calibration token "
                      f"(uncalibrated / experts per layer: {uncovered_summary(experts)}; every one is listed in "
                      f"{QUANT_JSON} experts.uncovered). Rule applied: {experts['rule']}. More prompts "
                      "(calib.n_samples) calibrate them on data.")


def _write_quant_summary(model, out_dir: Path) -> None:
    import contextlib
    import io

    import modelopt.torch.quantization as mtq

    with contextlib.redirect_stdout(io.StringIO()):  # it announces the file it writes
        mtq.print_quant_summary(model, str(out_dir))


def _previous_record(out_dir: Path) -> dict | None:
    """The output's quant.json with its gate record under "gate" (None when either is missing)."""
    quant_json = out_dir / QUANT_JSON
    verify = read_gate_record(out_dir / "verify.json")
    if not quant_json.exists() or verify is None:
        return None
    return {**read_json(quant_json), "gate": verify}
