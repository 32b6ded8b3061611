"""Stage `base`: the run's starting weights -> <run_dir>/base/model/ (HF dir) + <run_dir>/base/verify.json.

Source (model.base wins over model.init):
  model.base=<dir>   a DiffusionGemma dir (loaded as is) or a Gemma 4 causal LM (converted; parity measured);
  model.init=<name>  a named shape from dg_pipeline.model.configs, randomly initialised from `seed`, with the board
                     tokenizer (Sudoku recipes).
The saved dir is then reloaded the way every later stage and vLLM load it, and checked: encoder/decoder ties hold,
the reloaded encoder reproduces the in-memory model layer by layer with the same expert choices (parity at any depth:
dg_pipeline.model.parity), generation_config.json loads as a DiffusionGemmaGenerationConfig. verify.json is written in every case; a failed check then raises GateFailed.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion, DiffusionGemmaGenerationConfig

from dg_pipeline.core import GateFailed, InputError, RunDir, atomic_write_json, read_json
from dg_pipeline.core.fingerprint import stage_fingerprint_parts
from dg_pipeline.core.registry import reuse_beside_gate
from dg_pipeline.data.tokenizer import build_board_tokenizer
from dg_pipeline.model.configs import build_model
from dg_pipeline.model.convert import PARITY_THRESHOLDS, parity_probe
from dg_pipeline.model.io import load_base, resolve_device, resolve_dtype, save_model
from dg_pipeline.model.logits import encoder_causal_lm_logits
from dg_pipeline.model.parity import LAYER_TOLERANCE, MAX_ROUTING_DISAGREEMENT, Parity, logits_parity
from dg_pipeline.model.structure import parameter_counts, untied_backbone_weights
from dg_pipeline.settings import RunSettings
from dg_pipeline.verify.record import at_most, holds

STAGE = "base"
KIND_INIT = "init"
PROBE_TOKENS = 64  # tokens per row of the parity / reload probe (2 rows)

console = Console()


def run(cfg: DictConfig) -> dict:
    settings = RunSettings.from_cfg(cfg)
    rundir = RunDir.from_cfg(cfg)
    model_dir, verify_path = rundir.output(STAGE), rundir.verify_json(STAGE)
    request = source_request(settings)

    base_dir = Path(request["base"]).expanduser() if request["base"] else None
    fingerprint = stage_fingerprint_parts(cfg, STAGE, base_dir if base_dir and base_dir.is_dir() else None,
                                          upstream=f"init:{request['init']}" if request["init"] else str(base_dir))
    previous = read_json(verify_path) if verify_path.is_file() else None
    reuse = reuse_beside_gate(STAGE, model_dir, previous, fingerprint, force=settings.force)
    if reuse.skip:
        console.print(f"[bold]base[/]: skipped, {reuse.reason} (force=true rebuilds it)")
        return {**previous, "skipped": True}
    if model_dir.exists() and not settings.force:
        console.print(f"[bold]base[/]: rebuilding: {reuse.reason}")
    verify_path.unlink(missing_ok=True)  # a gate record only ever describes the output beside it

    started = time.perf_counter()
    device = resolve_device(settings.device)
    model, tokenizer, kind, conversion, source_input = build_base(settings.data.kind, request, device)
    with console.status(f"base: saving {model_dir}"):
        save_model(model, tokenizer, model_dir)
    with console.status("base: reloading the saved dir to check it"):
        checks, reload_parity = reload_checks(model, tokenizer, model_dir, request["dtype"], device)
    if conversion is not None:
        checks = conversion_checks(conversion, resolve_dtype(request["dtype"])) + checks

    record = {
        "stage": STAGE,
        "input": source_input,
        "source_kind": kind,
        "source": request,
        "model_dir": str(model_dir),
        "canvas_length": model.config.canvas_length,
        "vocab_size": model.config.text_config.vocab_size,
        "tokenizer_size": len(tokenizer),
        "dtype": request["dtype"],
        "device": device,
        "params": parameter_counts(model),
        "source_architecture": conversion.source_architecture if conversion else None,
        "source_params": conversion.source_params if conversion else None,
        "conversion_parity_max_abs_logit_diff": conversion.parity_max_abs_logit_diff if conversion else None,
        "conversion_parity": conversion.parity if conversion else None,
        "conversion": vars(conversion) if conversion else None,
        "fingerprint": fingerprint,
        "reload_parity": reload_parity,
        "eos_token_id": model.generation_config.eos_token_id,
        "passed": all(c["passed"] for c in checks),
        "checks": checks,
        "seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_json(verify_path, record)
    print_checks(record)
    if not record["passed"]:
        failed = ", ".join(c["name"] for c in checks if not c["passed"])
        raise GateFailed(f"stage=base: check(s) failed: {failed}; see {verify_path}")
    return record


# --- pieces --------------------------------------------------------------------------------------------------------


def source_request(settings: RunSettings) -> dict:
    """What the user asked for: the keys that decide the base model (recorded, and compared before a skip)."""
    model = settings.model
    if not model.base and not model.init:
        raise InputError("model.base is required (model.init is null): pass model.base=<local HF dir> (DiffusionGemma "
                         "or Gemma 4 causal LM), or model.init=<named config> (see dg_pipeline/model/configs.py)")
    if model.canvas_length is None and not model.base:
        raise InputError("model.canvas_length=None: must be a positive integer (the block length)")
    return {
        "base": model.base or None,
        "init": None if model.base else model.init,
        "canvas_length": model.canvas_length,
        "dtype": model.dtype,
        "vocab_size": None if model.base else model.vocab_size,
        "seed": settings.seed,
    }


def build_base(data_kind: str, request: dict, device: str):
    """(model, tokenizer, source kind, ConversionReport or None, input description) for the requested source."""
    dtype = resolve_dtype(request["dtype"])
    if request["base"]:
        with console.status(f"base: loading model.base={request['base']}"):
            loaded = load_base(
                request["base"], canvas_length=request["canvas_length"], dtype=dtype, device=device,
                check_parity=True, seed=request["seed"],
            )
        console.print(f"[bold]base[/]: {loaded.kind} from {loaded.info.path}")
        return loaded.model, loaded.tokenizer, loaded.kind, loaded.conversion, str(loaded.info.path)

    if data_kind != "sudoku":
        raise InputError(
            f"model.init={request['init']}: a randomly initialised model needs the board tokenizer, which only the "
            f"Sudoku data builds (data.kind=sudoku; here data.kind={data_kind}); pass model.base=<dir> instead"
        )
    tokenizer = build_board_tokenizer()
    with console.status(f"base: initialising model.init={request['init']} (seed {request['seed']})"):
        model = build_model(
            request["init"], tokenizer, request["canvas_length"], seed=request["seed"], dtype=dtype,
            vocab_size=request["vocab_size"],
        ).to(device)
    console.print(f"[bold]base[/]: random {request['init']} ({parameter_counts(model)['total']:,} parameters)")
    return model, tokenizer, KIND_INIT, None, f"init:{request['init']}"


def parity_checks(prefix: str, parity: Parity | dict, dtype: torch.dtype) -> list:
    """The parity figures a depth-robust comparison is held to (dg_pipeline.model.parity): each layer's output with
    the reference's input and expert choices, the logits from the last layer, and the routing decisions."""
    p = parity if isinstance(parity, dict) else parity.as_record()
    checks = [
        at_most(f"{prefix}_layer_relative_error", p["layer_relative_error"], LAYER_TOLERANCE[dtype]),
        at_most(f"{prefix}_pinned_max_abs_logit_diff", p["pinned_max_abs_logit_diff"], PARITY_THRESHOLDS[dtype]),
    ]
    if p["routing_disagreement"] is not None:
        checks.append(at_most(f"{prefix}_routing_disagreement", p["routing_disagreement"],
                              MAX_ROUTING_DISAGREEMENT[dtype]))
    return checks


def conversion_checks(conversion, dtype: torch.dtype) -> list[dict]:
    """Parity of the converted encoder (and vision tower) with Gemma 4; self-conditioning starts as a no-op."""
    checks = parity_checks("conversion_parity", conversion.parity, dtype)
    if conversion.vision_max_abs_diff is not None:
        checks.append(at_most("vision_parity_max_abs_diff", conversion.vision_max_abs_diff, PARITY_THRESHOLDS[dtype]))
    checks.append(at_most("self_conditioning_noop_max_abs_logit_diff", conversion.self_conditioning_max_abs_diff, 0.0))
    return [c.as_record() for c in checks]


@torch.no_grad()
def reload_checks(model, tokenizer, model_dir, dtype_name: str, device: str) -> tuple[list[dict], dict]:
    """Reload `model_dir` the way later stages and vLLM do and compare it with the in-memory model and tokenizer:
    (checks, the reload's parity figures)."""
    dtype = resolve_dtype(dtype_name)
    reloaded = DiffusionGemmaForBlockDiffusion.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    untied = untied_backbone_weights(reloaded)
    probe = parity_probe(model.config, length=PROBE_TOKENS).to(device)
    parity = logits_parity(
        model, model.model.encoder.language_model.layers, lambda: encoder_causal_lm_logits(model, probe),
        reloaded, reloaded.model.encoder.language_model.layers, lambda: encoder_causal_lm_logits(reloaded, probe),
    )
    saved_generation = DiffusionGemmaGenerationConfig.from_pretrained(model_dir)
    generation_ok = _as_json(saved_generation) == _as_json(model.generation_config)
    tokenizer_ok = AutoTokenizer.from_pretrained(model_dir).get_vocab() == tokenizer.get_vocab()
    checks = [
        at_most("untied_backbone_weights_after_reload", len(untied), 0),
        *parity_checks("reload", parity, dtype),
        holds("generation_config_round_trip", generation_ok),
        holds("tokenizer_round_trip", tokenizer_ok),
    ]
    return [c.as_record() for c in checks], parity.as_record()


def _as_json(generation_config) -> str:
    return generation_config.to_json_string(use_diff=False, ignore_metadata=True)


def print_checks(record: dict) -> None:
    table = Table(title=f"base: {record['source_kind']} -> {record['model_dir']}")
    for column in ("check", "value", "threshold", "passed"):
        table.add_column(column)
    for c in record["checks"]:
        table.add_row(c["name"], f"{c['value']}", f"{c['threshold']}", "[green]yes[/]" if c["passed"] else "[red]NO[/]")
    console.print(table)
