"""Benchmark: logits error of FP8 / NVFP4 vs the unquantized model, per calibration loop, and calibration wall time.

    python -m bench.quant_error [--model-dir <sft model dir>] [--shape tiny] [--n-calib 32] [--steps 48]
                                [--compare-cuda [--skip-table]]

Model: --model-dir (a trained DiffusionGemma dir, e.g. <run_dir>/sft/model of the sudoku4 recipe), else a randomly
initialised --shape (tiny / sudoku4). Calibration prompts: generated 4x4 Sudoku boards; the probe (dg_pipeline/quant/
probe.py) uses other boards. Rows:
- `stock FP8_DEFAULT_CFG, text loop`: ModelOpt's preset as is (self-conditioning quantized) calibrated by the
  standard loop -- the configuration of the original probe (logits error 0.29 on a tiny random model);
- our recipes (self-conditioning excluded unless the row says so) with calib.mode=diffusion and =text;
- `weight noise 2%`: every linear/expert weight times (1 + 0.02 N(0,1)), unquantized: how strongly the model
  amplifies a perturbation of FP8's size (a random model amplifies it a lot; a trained one much less).
--compare-cuda: on a CUDA host, max |CPU NVFP4 emulation - ModelOpt's CUDA fake-quant| on random tensors (prints
"no GPU" on a CPU host); with --skip-table only that comparison runs.
Prints a table and writes bench/results/quant_error.json.
"""

from __future__ import annotations

import argparse
import copy
import platform
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from dg_pipeline.core.io import atomic_write_json
from dg_pipeline.data import generate_boards, sudoku_examples
from dg_pipeline.data.tokenizer import build_board_tokenizer
from dg_pipeline.model import build_model, load_model
from dg_pipeline.quant import (
    LogitsErrorProbe,
    build_recipe,
    calibrate,
    diffusion_forward_loop,
    fake_quant_nvfp4,
    text_forward_loop,
)
from dg_pipeline.sampling import SamplerConfig

RESULTS = Path(__file__).resolve().parent / "results" / "quant_error.json"
console = Console(width=132)


def stock_fp8_text(model, calib, probe, args) -> dict:
    """ModelOpt's FP8_DEFAULT_CFG untouched, standard loop, no audit: what the original probe ran."""
    import time

    import modelopt.torch.quantization as mtq

    loop = text_forward_loop(calib, 0, model.config.canvas_length, args.batch_size, 512, console)
    t0 = time.perf_counter()
    mtq.quantize(model, copy.deepcopy(mtq.FP8_DEFAULT_CFG), loop)
    return {"calib_seconds": time.perf_counter() - t0, **probe.error(model)}


def our_recipe(model, calib, probe, args, fmt: str, mode: str, self_conditioning: bool = False) -> dict:
    recipe = build_recipe(fmt, "fp8_cast" if fmt == "nvfp4_experts_only" else "none", self_conditioning=self_conditioning)
    if mode == "diffusion":
        sampler = SamplerConfig.for_model(model, max_denoising_steps=args.steps)
        loop = diffusion_forward_loop(calib, 0, sampler, args.batch_size, 17, args.seed, console)
    else:
        loop = text_forward_loop(calib, 0, model.config.canvas_length, args.batch_size, 512, console)
    result = calibrate(model, recipe, loop)
    return {
        "calib_seconds": result.seconds,
        "expert_coverage": result.experts["coverage"],
        "uncovered_experts": len(result.experts["uncovered"]),
        "passes": result.passes,
        **probe.error(model),
    }


@torch.no_grad()
def weight_noise(model, probe, rel: float, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2 and not any(k in name for k in ("embed", "lm_head", "vision", "router", "self_conditioning")):
            p.mul_(1 + rel * torch.randn(p.shape, generator=gen))
    return probe.error(model)


def compare_cuda(seed: int) -> dict:
    if not torch.cuda.is_available():
        console.print("compare-cuda: no GPU on this host; run it on a CUDA machine")
        return {"available": False}
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    q = TensorQuantizer(QuantizerAttributeConfig(num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic",
                                                                                "scale_bits": (4, 3)}))
    gen = torch.Generator().manual_seed(seed)
    out = {"available": True, "device": torch.cuda.get_device_name(0), "cases": []}
    for label, scale in (("normal", 1.0), ("wide range rows", None)):
        x = torch.randn(256, 1024, generator=gen)
        if scale is None:
            x = x * torch.logspace(-4, 2, 256)[:, None]
        q.amax = x.abs().amax()
        cuda = q.to("cuda")(x.cuda()).cpu()
        cpu = fake_quant_nvfp4(x, x.abs().amax())
        diff = (cuda - cpu).abs()
        out["cases"].append({"case": label, "max_abs_diff": diff.max().item(), "differing": int((diff > 0).sum())})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--n-probe", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=48, help="max denoising steps of the calibration trajectories")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-cuda", action="store_true")
    ap.add_argument("--skip-table", action="store_true", help="with --compare-cuda: only the CUDA comparison")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/quant_error.json)")
    args = ap.parse_args()
    if args.compare_cuda and args.skip_table:
        result = compare_cuda(args.seed)
        console.print(result)
        atomic_write_json(args.out or RESULTS.with_name("nvfp4_cuda_vs_cpu.json"), result)
        return

    tokenizer = build_board_tokenizer()
    if args.model_dir:
        base, tokenizer = load_model(args.model_dir)
        label = args.model_dir
    else:
        base = build_model(args.shape, tokenizer, canvas_length=32, seed=args.seed)
        label = f"{args.shape} (random init)"
    boards = generate_boards(4, args.n_calib + args.n_probe, 4, 10, seed=args.seed)
    examples = sudoku_examples(boards, tokenizer)
    calib, probe_prompts = examples[: args.n_calib], [e.prompt_ids for e in examples[args.n_calib :]]

    rows = []

    def add(what, fn):
        model = copy.deepcopy(base)
        probe = LogitsErrorProbe(model, probe_prompts, args.seed)
        rows.append({"what": what, **fn(model, probe)})

    add("stock FP8_DEFAULT_CFG, text loop", lambda m, p: stock_fp8_text(m, calib, p, args))
    for fmt in ("fp8", "nvfp4", "nvfp4_experts_only"):
        for mode in ("diffusion", "text"):
            add(f"{fmt}, {mode} loop", lambda m, p, f=fmt, md=mode: our_recipe(m, calib, p, args, f, md))
    add("fp8 + self-conditioning, diffusion loop", lambda m, p: our_recipe(m, calib, p, args, "fp8", "diffusion", True))
    add("weight noise 2% (unquantized)", lambda m, p: weight_noise(m, p, 0.02, args.seed))

    table = Table(title=f"logits relative error vs unquantized - {label} - CPU, {torch.get_num_threads()} threads")
    for col in ("what", "all", "first step", "self-cond. step", "calib s", "expert coverage"):
        table.add_column(col, justify="left" if col == "what" else "right")
    for r in rows:
        table.add_row(
            r["what"], f"{r['logits_relative_error']:.4f}", f"{r['first_step']:.4f}", f"{r['self_conditioned_step']:.4f}",
            f"{r['calib_seconds']:.1f}" if "calib_seconds" in r else "-",
            f"{r['expert_coverage']:.0%}" if "expert_coverage" in r else "-",
        )
    console.print(table)
    result = {"model": label, "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "n_calib": args.n_calib, "n_probe": args.n_probe, "steps": args.steps, "rows": rows}
    if args.compare_cuda:
        result["compare_cuda"] = compare_cuda(args.seed)
        console.print(result["compare_cuda"])
    atomic_write_json(args.out or RESULTS, result)
    console.print(f"wrote {args.out or RESULTS}")


if __name__ == "__main__":
    main()
