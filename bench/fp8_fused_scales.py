"""Benchmark: FP8 fused groups with one shared scale vs today's per-shard scales, on a run's held-out boards.

    python -m bench.fp8_fused_scales --run-dir <run_dir> [--quantize-dir <run_dir>/quantize/fp8] [--n-eval N]

vLLM runs q/k/v and gate/up as one GEMM with one weight scale. Three FP8 checkpoints of the same calibrated model
(the run's quantize/fp8 ModelOpt state) are compared:
- `per-shard (as exported)`: each linear's weight scale from its own range, what the export wrote before the shared
  scales; the weight-only reload the export gate measured;
- `per-shard (as vLLM loads it)`: the same file after vLLM's load-time fix (requantize_with_max_scale: every shard
  dequantized with its own scale and re-rounded with the group's max): what vLLM actually served;
- `shared (this pipeline)`: one scale per group at calibration, each weight rounded once with it.
Per checkpoint: the relative weight error of the fused linears, the logits relative error vs the unquantized SFT
model (quant/probe.py, the quantize gate's probe) and the solve rate of the reloaded bundle on the run's eval boards
(the SFT gate's held-out boards, same seed and sampler). The fake-quantized models' logits error is reported too.
Prints a table and writes bench/results/fp8_fused_scales.json.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file

from dg_pipeline.core import RunDir, read_json
from dg_pipeline.core.io import atomic_write_json
from dg_pipeline.data import load_eval_examples
from dg_pipeline.export import export_quantized, load_export, release_generation_config
from dg_pipeline.export.formats import FP8, split_leaf
from dg_pipeline.model import load_model
from dg_pipeline.model.vllm_contract import fused_group
from dg_pipeline.quant import LogitsErrorProbe, read_quant_record, restore_quantized
from dg_pipeline.quant.fused import fused_quantizer_groups
from dg_pipeline.settings import RunSettings, compose
from dg_pipeline.verify import GateSettings, run_gate

RESULTS = Path(__file__).resolve().parent / "results" / "fp8_fused_scales.json"
console = Console(width=140)


@torch.no_grad()
def per_shard_scales(model) -> int:
    """Undo the shared scales: each fused linear's weight amax back to its own max|W| (what max calibration gives
    a per-tensor FP8 weight quantizer). Returns how many quantizers changed."""
    changed = 0
    for members in fused_quantizer_groups(model).values():
        for module in members:
            q = getattr(module, "weight_quantizer", None)
            if q is None or not q.is_enabled or getattr(q, "_amax", None) is None or q._amax.numel() != 1:
                continue
            own = module.weight.detach().abs().amax().float().reshape(q._amax.shape).to(q._amax)
            changed += int(not torch.equal(own, q._amax))
            q.amax = own
    return changed


def requantize_like_vllm(src: Path, dst: Path) -> int:
    """A copy of an FP8 bundle with every fused group's shards re-rounded to the group's max weight scale, as vLLM's
    requantize_with_max_scale does at load (dequantize with the own scale, quantize with the max). Returns how many
    linears were re-rounded."""
    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    tensors = load_file(path)
    groups: dict[str, list[str]] = {}
    for name, t in tensors.items():
        module, leaf = split_leaf(name)
        if leaf == "weight" and t.dtype == FP8.weight_dtype and fused_group(module):
            groups.setdefault(fused_group(module)[0], []).append(module)
    rerounded = 0
    for modules in groups.values():
        scales = {m: tensors[f"{m}.weight_scale"].float() for m in modules}
        top = torch.stack(list(scales.values())).max()
        for m in modules:
            if bool(scales[m] < top):
                w = tensors[f"{m}.weight"].float() * scales[m] / top
                tensors[f"{m}.weight"] = w.clamp(-448, 448).to(FP8.weight_dtype)
                rerounded += 1
            tensors[f"{m}.weight_scale"] = top.clone().reshape(tensors[f"{m}.weight_scale"].shape)
    save_file(tensors, path, metadata={"format": "pt"})
    return rerounded


def fused_weight_error(bundle: Path, reference_state: dict) -> float:
    """Mean relative L2 error of the dequantized fused linears (q/k/v, gate/up) vs the unquantized weights."""
    reloaded = load_export(bundle, verify=False).model.state_dict()
    errors = []
    for name, w in reference_state.items():
        module, leaf = split_leaf(name)
        if leaf == "weight" and name.startswith("model.decoder.") and fused_group(module) and "experts" not in module:
            errors.append(float((reloaded[name].float() - w).norm() / w.norm()))
    return sum(errors) / len(errors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--quantize-dir", type=Path, help="default <run_dir>/quantize/fp8")
    ap.add_argument("--n-eval", type=int, help="boards (default: the run's eval split, as the SFT gate)")
    ap.add_argument("--probe-prompts", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    quant_dir = args.quantize_dir or args.run_dir / "quantize" / "fp8"
    record = read_quant_record(quant_dir)
    if record.get("format") != "fp8":
        raise SystemExit(f"{quant_dir}: a {record.get('format')} quantize output; this benchmark compares FP8 scales")
    overrides = ["logger=none", "device=cpu", "verify.ar_baseline=false", "verify.plots=false",
                 "verify.speed_examples=1"] + ([f"verify.n_eval={args.n_eval}"] if args.n_eval else [])
    cfg = compose([f"run_dir={args.run_dir}", *overrides])
    settings = RunSettings.from_cfg(cfg)
    gate_settings = GateSettings.for_run(settings)
    base_dir = Path(record["base_model_dir"])
    unquantized, tokenizer = load_model(base_dir)
    examples = load_eval_examples(settings.data, tokenizer, RunDir.from_cfg(cfg), settings.seed,
                                  limit=gate_settings.n_eval)
    probe = LogitsErrorProbe(unquantized, [e.prompt_ids for e in examples[: args.probe_prompts]], settings.seed)
    reference_state = {k: v.float() for k, v in unquantized.state_dict().items()}
    sft = read_json(base_dir.parent / "verify.json") if (base_dir.parent / "verify.json").is_file() else {}

    rows, work = [], Path(tempfile.mkdtemp(prefix="fp8_fused_"))
    try:
        bundles, fake_quant = {}, {}
        for variant in ("per-shard", "shared"):
            model, tok, _ = restore_quantized(quant_dir)
            changed = per_shard_scales(model) if variant == "per-shard" else 0
            fake_quant[variant] = probe.error(model)["logits_relative_error"]
            out = work / variant
            out.mkdir()
            export_quantized(model, tok, out, release_generation_config(model, tok), share_fused=variant == "shared")
            bundles[variant] = (out, changed)
        vllm_dir = work / "per-shard-vllm"
        rerounded = requantize_like_vllm(bundles["per-shard"][0], vllm_dir)
        variants = [("per-shard (as exported)", bundles["per-shard"][0], fake_quant["per-shard"]),
                    ("per-shard (as vLLM loads it)", vllm_dir, None),
                    ("shared (this pipeline)", bundles["shared"][0], fake_quant["shared"])]
        for label, bundle, fq in variants:
            t0 = time.perf_counter()
            reloaded = load_export(bundle, verify=False)
            gate = run_gate(reloaded.model, reloaded.tokenizer, examples, gate_settings, "eval", bundle,
                            work / "gates" / label, console=console)
            rows.append({
                "variant": label,
                "fused_weight_rel_error": fused_weight_error(bundle, reference_state),
                "fake_quant_logits_rel_error": fq,
                "reload_logits_rel_error": probe.error(reloaded.model)["logits_relative_error"],
                "solved": gate["accuracy"],
                "n_eval": gate["n_eval"],
                "mean_denoising_steps": gate.get("mean_denoising_steps"),
                "seconds": round(time.perf_counter() - t0, 1),
            })
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = Table(title=f"FP8 fused-group scales on {quant_dir} ({rows[0]['n_eval']} eval boards; SFT gate "
                        f"{sft.get('accuracy', '-')})")
    for col in ("checkpoint", "q/k/v, gate/up weight rel. err", "logits rel. err (fake-quant)",
                "logits rel. err (reload)", "solved (reload)", "steps/block"):
        table.add_column(col, justify="left" if col == "checkpoint" else "right")
    for r in rows:
        fq = "-" if r["fake_quant_logits_rel_error"] is None else f"{r['fake_quant_logits_rel_error']:.5f}"
        table.add_row(r["variant"], f"{r['fused_weight_rel_error']:.5f}", fq, f"{r['reload_logits_rel_error']:.5f}",
                      f"{r['solved']:.3f}", f"{r['mean_denoising_steps'] or 0:.2f}")
    console.print(table)
    console.print(f"per-shard: {bundles['per-shard'][1]} weight quantizers back to their own range; vLLM's load "
                  f"re-rounds {rerounded} linears of the per-shard file")
    atomic_write_json(RESULTS, {
        "quantize_dir": str(quant_dir), "sft_accuracy": sft.get("accuracy"), "rows": rows,
        "per_shard_quantizers": bundles["per-shard"][1], "vllm_rerounded_linears": rerounded,
        "host": platform.node(), "threads": args.threads,
    })
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
