"""Stage `base`: the run's starting weights -> <run_dir>/base/model/ (HF dir) + <run_dir>/base/verify.json.

Source (model.base wins over model.init):
  model.base=<dir>   a DiffusionGemma dir (loaded as is) or a Gemma 4 causal LM (converted; parity measured);
  model.init=<name>  a named shape from dg_pipeline.model.configs, randomly initialised from `seed`, with the board
                     tokenizer (Sudoku recipes).
The saved dir is then reloaded the way every later stage and vLLM load it, and checked: encoder/decoder ties hold,
the reloaded encoder reproduces the in-memory logits, generation_config.json loads as a
DiffusionGemmaGenerationConfig. verify.json is written in every case; a failed check then raises GateFailed.
"""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion, DiffusionGemmaGenerationConfig

from dg_pipeline.core import GateFailed, InputError, RunDir, atomic_write_json, read_json
from dg_pipeline.data.tokenizer import build_board_tokenizer
from dg_pipeline.model.configs import build_model
from dg_pipeline.model.convert import PARITY_THRESHOLDS, parity_probe
from dg_pipeline.model.io import load_base, resolve_dtype, save_model
from dg_pipeline.model.logits import encoder_causal_lm_logits
from dg_pipeline.model.structure import parameter_counts, untied_backbone_weights

STAGE = "base"
KIND_INIT = "init"
PROBE_TOKENS = 64  # tokens per row of the parity / reload probe (2 rows)

console = Console()


def run(cfg: DictConfig) -> dict:
    rundir = RunDir.from_cfg(cfg)
    model_dir, verify_path = rundir.model_dir(STAGE), rundir.verify_json(STAGE)
    request = source_request(cfg)

    if model_dir.exists() and verify_path.exists() and not cfg.get("force", False):
        record = read_json(verify_path)
        if record.get("passed"):
            _refuse_if_built_differently(record, request, rundir)
            console.print(f"[bold]base[/]: skipped, {model_dir} exists (force=true rebuilds it)")
            return {**record, "skipped": True}
        console.print(f"[bold]base[/]: {verify_path} recorded a failed check; rebuilding")

    started = time.perf_counter()
    device = resolve_device(str(cfg.get("device", "auto")))
    model, tokenizer, kind, conversion, source_input = build_base(cfg, request, device)
    with console.status(f"base: saving {model_dir}"):
        save_model(model, tokenizer, model_dir)
    with console.status("base: reloading the saved dir to check it"):
        checks = reload_checks(model, tokenizer, model_dir, request["dtype"], device)
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
        "conversion": vars(conversion) if conversion else None,
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


def source_request(cfg: DictConfig) -> dict:
    """What the user asked for: the keys that decide the base model (recorded, and compared before a skip)."""
    model_cfg = cfg.model
    if OmegaConf.is_missing(model_cfg, "base"):
        raise InputError("model.base is required by this recipe: pass model.base=<local HF dir> (DiffusionGemma or "
                         "Gemma 4 causal LM)")
    base, init = model_cfg.get("base"), model_cfg.get("init")
    if not base and not init:
        raise InputError("model.base and model.init are both null: pass model.base=<local HF dir> or "
                         "model.init=<named config> (see dg_pipeline/model/configs.py)")
    canvas_length = model_cfg.get("canvas_length")
    if not (canvas_length is None and base) and (not isinstance(canvas_length, int) or canvas_length <= 0):
        raise InputError(f"model.canvas_length={canvas_length}: must be a positive integer (the block length)")
    return {
        "base": str(base) if base else None,
        "init": None if base else str(init),
        "canvas_length": canvas_length,
        "dtype": str(model_cfg.get("dtype", "float32")),
        "vocab_size": None if base else model_cfg.get("vocab_size"),
        "seed": int(cfg.get("seed", 0)),
    }


def _refuse_if_built_differently(record: dict, request: dict, rundir: RunDir) -> None:
    built = record.get("source") or {}
    changed = {k: (built.get(k), v) for k, v in request.items() if built.get(k) != v}
    if changed:
        diffs = ", ".join(f"{k}: built with {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise InputError(
            f"{rundir.stage(STAGE)} was built from other settings ({diffs}); pass force=true to rebuild it, or use "
            f"another run_dir"
        )


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"device={device}: choose cpu, cuda or auto")
    return device


def build_base(cfg: DictConfig, request: dict, device: str):
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

    data_kind = str(cfg.get("data", {}).get("kind", "sudoku"))
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


def check(name: str, value, threshold, passed: bool) -> dict:
    return {"name": name, "value": value, "threshold": threshold, "passed": bool(passed)}


def conversion_checks(conversion, dtype: torch.dtype) -> list[dict]:
    """Parity of the converted encoder (and vision tower) with Gemma 4; self-conditioning starts as a no-op."""
    threshold = PARITY_THRESHOLDS[dtype]
    checks = [
        check("conversion_parity_max_abs_logit_diff", conversion.parity_max_abs_logit_diff, threshold,
              conversion.parity_max_abs_logit_diff <= threshold),
        check("self_conditioning_noop_max_abs_logit_diff", conversion.self_conditioning_max_abs_diff, 0.0,
              conversion.self_conditioning_max_abs_diff == 0.0),
    ]
    if conversion.vision_max_abs_diff is not None:
        checks.insert(1, check("vision_parity_max_abs_diff", conversion.vision_max_abs_diff, threshold,
                               conversion.vision_max_abs_diff <= threshold))
    return checks


@torch.no_grad()
def reload_checks(model, tokenizer, model_dir, dtype_name: str, device: str) -> list[dict]:
    """Reload `model_dir` the way later stages and vLLM do and compare it with the in-memory model and tokenizer."""
    dtype = resolve_dtype(dtype_name)
    reloaded = DiffusionGemmaForBlockDiffusion.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    untied = untied_backbone_weights(reloaded)
    probe = parity_probe(model.config, length=PROBE_TOKENS).to(device)
    reload_diff = (encoder_causal_lm_logits(model, probe) - encoder_causal_lm_logits(reloaded, probe)).abs().max()
    reload_diff, threshold = reload_diff.item(), PARITY_THRESHOLDS[dtype]
    saved_generation = DiffusionGemmaGenerationConfig.from_pretrained(model_dir)
    generation_ok = _sampler_settings(saved_generation) == _sampler_settings(model.generation_config)
    tokenizer_ok = AutoTokenizer.from_pretrained(model_dir).get_vocab() == tokenizer.get_vocab()
    return [
        check("untied_backbone_weights_after_reload", len(untied), 0, not untied),
        check("reload_max_abs_logit_diff", reload_diff, threshold, reload_diff <= threshold),
        check("generation_config_round_trip", generation_ok, True, generation_ok),
        check("tokenizer_round_trip", tokenizer_ok, True, tokenizer_ok),
    ]


def _sampler_settings(generation_config) -> str:
    return generation_config.to_json_string(use_diff=False, ignore_metadata=True)


def print_checks(record: dict) -> None:
    table = Table(title=f"base: {record['source_kind']} -> {record['model_dir']}")
    for column in ("check", "value", "threshold", "passed"):
        table.add_column(column)
    for c in record["checks"]:
        table.add_row(c["name"], f"{c['value']}", f"{c['threshold']}", "[green]yes[/]" if c["passed"] else "[red]NO[/]")
    console.print(table)
