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
                                                     verify.max_accuracy_drop defaulting to quant.max_accuracy_drop
Skipped when its outputs exist, passed, and were made with the same settings on the same input (the
fingerprint in quant.json), unless force=true. Throughput is a simulation (fake quantization) except
the real-FP8 linears of quant=fp8 on a CUDA device with compute capability >= 8.9 (quant.fp8_gemm). The gate runs
after the state is saved, on weights folded once (`fold_weights_for_eval`: same logits, no per-forward re-rounding).
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from dg_pipeline.core import InputError, RunDir, atomic_dir, atomic_write_json, read_json
from dg_pipeline.core.fingerprint import input_identity, stage_fingerprint
from dg_pipeline.data import load_splits
from dg_pipeline.model.io import load_model
from dg_pipeline.quant import (
    CALIB_MODES,
    QUANT_JSON,
    LogitsErrorProbe,
    build_recipe,
    calibrate,
    calibration_examples,
    diffusion_forward_loop,
    fold_weights_for_eval,
    fp8_gemm_supported,
    save_quantized,
    swap_in_fp8_gemms,
    text_forward_loop,
    uncovered_summary,
)
from dg_pipeline.stages.base import resolve_device
from dg_pipeline.stages.eval import eval_examples, provider_record
from dg_pipeline.verify import gate_reference, run_gate

STAGE = "quantize"
console = Console()


def output_name(cfg: DictConfig) -> str:
    """<quant> for the default diffusion calibration, <quant>-<mode> otherwise (so a text-calibrated comparison run
    does not overwrite the model export reads)."""
    name, mode = str(cfg.quant.name), str(cfg.calib.mode)
    return name if mode == "diffusion" else f"{name}-{mode}"


def run(cfg: DictConfig) -> dict:
    rd = RunDir.from_cfg(cfg)
    name = str(cfg.quant.name)
    out_dir = rd.stage(STAGE) / output_name(cfg)
    input_dir = rd.resolve_input(STAGE, cfg.get("input"))
    fingerprint = stage_fingerprint(cfg, STAGE, input_identity(input_dir))
    previous = _previous_record(out_dir, fingerprint)
    if previous is not None and not cfg.get("force", False):
        console.print(f"[bold]quantize[/]: skipped, {out_dir} passed with these settings on this input "
                      "(force=true re-calibrates)")
        return {**previous, "skipped": True}
    reference = gate_reference(cfg, STAGE, input_dir, provider_record(input_dir))  # before calibrating
    device = resolve_device(str(cfg.get("device", "auto")))
    recipe = build_recipe(
        name,
        str(cfg.quant.kv_cache),
        self_conditioning=bool(cfg.quant.get("self_conditioning", False)),
        extra_exclusions=list(cfg.quant.get("exclude") or []),
        nvfp4_backend=str(cfg.quant.get("nvfp4_backend", "auto")),
        device=device,
    )
    mode = str(cfg.calib.mode)
    check_calib_mode(mode, recipe.self_conditioning)

    with console.status(f"quantize: loading {input_dir}"):
        model, tokenizer = load_model(input_dir, dtype=str(cfg.model.dtype), device=device)
    splits = load_splits(cfg.data, tokenizer, rd, seed=int(cfg.seed))
    calib = calibration_examples(splits.train, int(cfg.calib.n_samples), int(cfg.calib.max_length))
    probe = LogitsErrorProbe(model, [e.prompt_ids for e in splits.eval[: int(cfg.quant.probe_prompts)]], int(cfg.seed))
    console.print(
        f"[bold]quantize[/]: {name} (kv cache {recipe.kv_cache}) of {input_dir} on {device}; calib.mode={mode}, "
        f"{len(calib)} prompts" + (f", NVFP4 via backend {recipe.nvfp4_backend}" if recipe.nvfp4_backend else "")
    )

    loop, calib_settings = forward_loop(cfg, mode, model, tokenizer, calib)
    result = calibrate(model, recipe, loop)
    error = probe.error(model)
    record = {**quant_record(cfg, recipe, input_dir, calib_settings, result, error), "fingerprint": fingerprint}
    print_calibration(record)

    with atomic_dir(out_dir) as tmp:
        save_quantized(model, tmp)
        _write_quant_summary(model, tmp)
        atomic_write_json(tmp / QUANT_JSON, record)

    fp8_linears = gate_with_fp8_gemms(cfg, model, name, device)
    folded = fold_weights_for_eval(model)  # saved above; the gate's forwards need not re-round the weights
    simulated = True  # fake quantization somewhere (all of it, or the experts next to real-FP8 linears)
    console.print(
        "[yellow]note[/]: tokens/s below are a simulation: weights and activations are fake-quantized "
        + (f"(except {len(fp8_linears)} linears running real FP8 GEMMs)" if fp8_linears else "(no native FP8/FP4 kernels)")
    )
    gate = run_gate(
        model, tokenizer, eval_examples(cfg, tokenizer, rd), cfg, STAGE, input_dir, out_dir,
        reference=reference, simulated=simulated,
        extra={
            "quant": name,
            "kv_cache": recipe.kv_cache,
            "calib_mode": mode,
            "logits_relative_error": error["logits_relative_error"],
            "fp8_gemm_linears": len(fp8_linears),
            "folded_weight_quantizers": folded,
            "simulation_note": "throughput of fake-quantized weights/activations; not a deployment figure",
        },
    )
    return {**record, "gate": gate}


def check_calib_mode(mode: str, self_conditioning: bool) -> None:
    if mode not in CALIB_MODES:
        raise InputError(f"calib.mode={mode}: choose one of {', '.join(CALIB_MODES)} (conf/calib/<mode>.yaml)")
    if mode == "text" and self_conditioning:
        raise InputError(
            "quant.self_conditioning=true with calib.mode=text: the text loop never runs a self-conditioned decoder "
            "pass, so those quantizers would calibrate on zeros; use calib.mode=diffusion or quant.self_conditioning=false"
        )


def forward_loop(cfg: DictConfig, mode: str, model, tokenizer, calib: list):
    """The ModelOpt forward loop for calib.mode and the settings it runs with (recorded in quant.json)."""
    c = cfg.calib
    batch_size, max_length = int(c.batch_size), int(c.max_length)
    settings = {"mode": mode, "n_samples": len(calib), "requested_n_samples": int(c.n_samples),
                "batch_size": batch_size, "max_length": max_length, "split": "train"}
    if mode == "text":
        loop = text_forward_loop(calib, tokenizer.pad_token_id, model.config.canvas_length, batch_size, max_length, console)
        return loop, settings
    from dg_pipeline.sampling import SamplerConfig
    from dg_pipeline.verify.gate import resolve_max_new_tokens

    longest_prompt = max(len(e.prompt_ids) for e in calib)
    max_new = c.get("max_new_tokens") or resolve_max_new_tokens(cfg, calib)
    max_new = max(1, min(int(max_new), max_length - longest_prompt))
    sampler_config = SamplerConfig.from_hydra(cfg.sampler, model.generation_config)
    seed = int(c.get("seed") if c.get("seed") is not None else cfg.seed)
    settings.update(max_new_tokens=max_new, seed=seed, max_denoising_steps=sampler_config.max_denoising_steps,
                    acceptance=sampler_config.acceptance)
    loop = diffusion_forward_loop(calib, tokenizer.pad_token_id, sampler_config, batch_size, max_new, seed, console)
    return loop, settings


def quant_record(cfg, recipe, input_dir: Path, calib_settings: dict, result, error: dict) -> dict:
    """quant.json: what was quantized how, from which model, and what calibration measured."""
    return {
        "stage": STAGE,
        "format": recipe.name,
        "kv_cache": recipe.kv_cache,
        "source": recipe.source,
        "nvfp4_backend": recipe.nvfp4_backend,
        "base_model_dir": str(input_dir),
        "dtype": str(cfg.model.dtype),
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
        "max_accuracy_drop": cfg.quant.get("max_accuracy_drop"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def gate_with_fp8_gemms(cfg: DictConfig, model, name: str, device: str) -> list[str]:
    """quant=fp8 on Hopper+: swap the FP8-quantized linears for real FP8 GEMMs before the gate (after saving)."""
    choice = str(cfg.quant.get("fp8_gemm", "auto"))
    if choice not in ("auto", "false"):
        raise InputError(f"quant.fp8_gemm={choice}: choose auto (real FP8 GEMMs where supported) or false")
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


def _previous_record(out_dir: Path, fingerprint: str) -> dict | None:
    """The output to reuse: it passed its gate, with the same quantize settings, on the same input."""
    quant_json, verify_json = out_dir / QUANT_JSON, out_dir / "verify.json"
    if not (quant_json.exists() and verify_json.exists()):
        return None
    record, verify = read_json(quant_json), read_json(verify_json)
    if record.get("fingerprint") != fingerprint:
        console.print(f"[bold]quantize[/]: {out_dir} was made with other settings or another input; re-calibrating")
        return None
    return {**record, "gate": verify} if verify.get("passed") else None
