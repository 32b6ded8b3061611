"""Benchmark: our block-diffusion sampler vs the reference `generate` vs autoregressive decoding, same checkpoint.

    python -m bench.sampler --init sudoku4                       # random-init named config (CPU)
    python -m bench.sampler --init bench100m --batch-sizes 1 --repeats 1 --warmup 0
    python -m bench.sampler --model runs/x/sft/model             # a trained model dir
    python -m bench.sampler --init bench100m --device cuda       # GPU host: bf16, compiled sampler (compile=auto)

Per batch size: `--warmup` untimed calls per method (compilation, CUDA graphs, lazy init), then `--repeats` rounds
with the methods interleaved (so load from other jobs hits them alike). Reports wall time (median and min), this
process's CPU time (less sensitive to other jobs on a shared CPU), tokens/s, decoder forwards, tokens per forward,
mean denoising steps per block, and our speedup over the reference; checks our tokens equal the reference's.
Random-init weights never get confident, so every block runs all max_denoising_steps; a trained model stops early.
Writes bench/results/sampler-<model>-<device>.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from dg_pipeline.core.io import atomic_write_json
from dg_pipeline.data import build_board_tokenizer, generate_boards, left_padded_prompts, sudoku_examples
from dg_pipeline.model import build_model, load_model, resolve_dtype
from dg_pipeline.sampling import BlockDiffusionSampler, GenerationResult, SamplerConfig, ar_generate
from dg_pipeline.settings import CONF_DIR, ModelSettings, group_settings
from dg_pipeline.settings.sampler import generation_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
METHODS = ("ours", "reference", "ar")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, help="a DiffusionGemma model dir")
    source.add_argument("--init", default="sudoku4", help="random-init named config (tiny, sudoku4, bench100m, ...)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompts", default="random", choices=("random", "sudoku4", "sudoku9"),
                   help="random token prompts, or real Sudoku boards (for a trained board model)")
    p.add_argument("--prompt-length", type=int, default=18, help="random prompt tokens (18 = a 4x4 Sudoku prompt)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: one canvas")
    p.add_argument("--steps", type=int, default=None, help="max_denoising_steps (default: the checkpoint's, 48)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per method first (0 on CPU for big models)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto = float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--compile", default="auto", help="our sampler: auto (on for CUDA) | true | false")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--eos", action=argparse.BooleanOptionalAction, default=None,
                   help="stop at EOS (default: yes for --model, no for --init so every run does the same work)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args()


def load(args, device: torch.device, dtype: torch.dtype):
    if args.model is not None:
        model, tokenizer = load_model(args.model, dtype=dtype, device=str(device))
        return model, tokenizer, args.model.name
    shape = group_settings(ModelSettings, OmegaConf.load(CONF_DIR / "model" / f"{args.init}.yaml"))
    tokenizer = build_board_tokenizer()
    model = build_model(args.init, tokenizer, shape.canvas_length, seed=args.seed, dtype=dtype,
                        vocab_size=shape.vocab_size)
    model.generation_config = generation_config(tokenizer)
    return model.to(device), tokenizer, args.init


def timed(fn) -> tuple[GenerationResult, float, float]:
    """(result, wall s, CPU s of this process)."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def prompt_batch(args, tokenizer, batch: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    if args.prompts == "random":
        ids = torch.randint(6, vocab, (batch, args.prompt_length), generator=torch.Generator().manual_seed(args.seed))
        return ids, torch.ones_like(ids, dtype=torch.bool)
    size = int(args.prompts[-1])
    boards = generate_boards(size, batch, *((4, 10) if size == 4 else (30, 45)), seed=args.seed)
    return left_padded_prompts(sudoku_examples(boards, tokenizer), tokenizer.pad_token_id)


def run_batch(model, tokenizer, gen_cfg, sampler, args, batch: int, vocab: int, device) -> list[dict]:
    ids, mask = prompt_batch(args, tokenizer, batch, vocab)
    ids, mask = ids.to(device), mask.to(device)
    max_new = args.max_new_tokens or model.config.canvas_length
    eos = tuple(sampler.config.eos_token_ids)

    def reference():
        torch.manual_seed(args.seed)
        out = model.generate(ids, attention_mask=mask.long(), generation_config=gen_cfg, max_new_tokens=max_new)
        new = out.sequences[:, ids.shape[1]:].cpu()
        committed = (new != gen_cfg.pad_token_id).sum(-1)
        forwards = torch.round(committed / out.tokens_per_forward.cpu()).long()
        return GenerationResult(new, forwards, committed, [], 0.0)

    calls = {
        "ours": lambda: sampler.generate(ids, mask, max_new_tokens=max_new, seed=args.seed),
        "reference": reference,
        "ar": lambda: ar_generate(model, ids, mask, max_new_tokens=max_new, eos_token_ids=eos),
    }
    calls = {m: calls[m] for m in args.methods}
    for _ in range(args.warmup):
        for fn in calls.values():
            fn()
    runs: dict[str, list] = {m: [] for m in calls}
    for _ in range(args.repeats):
        for name, fn in calls.items():
            runs[name].append(timed(fn))
            if device.type == "cuda":
                torch.cuda.synchronize()

    rows = []
    for name, samples in runs.items():
        result = samples[0][0]
        wall = [s[1] for s in samples]
        cpu = [s[2] for s in samples]
        tokens = int(result.committed_tokens.sum())
        rows.append({
            "method": name,
            "batch": batch,
            "wall_s_median": statistics.median(wall),
            "wall_s_min": min(wall),
            "cpu_s_median": statistics.median(cpu),
            "tokens": tokens,
            "tokens_per_s": tokens / statistics.median(wall),
            "decoder_forwards": float(result.decoder_forwards.float().mean()),
            "tokens_per_forward": float(result.tokens_per_forward.mean()),
            "mean_steps_per_block": result.mean_denoising_steps if name == "ours" else None,
        })
    by = {r["method"]: r for r in rows}
    if "ours" in by and "reference" in by:
        ours, ref = by["ours"], by["reference"]
        ours["speedup_vs_reference"] = ref["wall_s_median"] / ours["wall_s_median"]
        ours["speedup_vs_reference_min"] = ref["wall_s_min"] / ours["wall_s_min"]
        ours["cpu_speedup_vs_reference"] = ref["cpu_s_median"] / max(ours["cpu_s_median"], 1e-9)
        same = torch.equal(runs["ours"][0][0].sequences, runs["reference"][0][0].sequences)
        ours["same_tokens_as_reference"] = bool(same)
        ref["mean_steps_per_block"] = ours["mean_steps_per_block"] if ours["same_tokens_as_reference"] else None
    if "ours" in by and "ar" in by:
        by["ours"]["speedup_vs_ar"] = by["ours"]["tokens_per_s"] / by["ar"]["tokens_per_s"]
    return rows


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU, {os.cpu_count()} cores ({cpu}), {torch.get_num_threads()} torch threads"


def print_table(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    columns = ("batch", "method", "wall s (med)", "wall s (min)", "CPU s", "tokens/s", "fwd/row", "tok/fwd",
               "steps/block", "speedup vs ref", "CPU speedup", "same tokens")
    for col in columns:
        table.add_column(col, justify="left" if col == "method" else "right")

    def fmt(v, spec=".2f"):
        return "" if v is None else format(v, spec) if isinstance(v, float) else str(v)

    for r in rows:
        table.add_row(str(r["batch"]), r["method"], fmt(r["wall_s_median"], ".3f"), fmt(r["wall_s_min"], ".3f"),
                      fmt(r["cpu_s_median"], ".3f"), fmt(r["tokens_per_s"], ".1f"), fmt(r["decoder_forwards"], ".1f"),
                      fmt(r["tokens_per_forward"]), fmt(r["mean_steps_per_block"], ".1f"),
                      fmt(r.get("speedup_vs_reference")), fmt(r.get("cpu_speedup_vs_reference")),
                      fmt(r.get("same_tokens_as_reference")))
    Console(width=160).print(table)


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = resolve_dtype(args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, name = load(args, device, dtype)
    use_eos = args.eos if args.eos is not None else args.model is not None
    gen_cfg = generation_config(tokenizer, base=model.generation_config if args.model else None,
                                max_denoising_steps=args.steps)
    if not use_eos:
        gen_cfg.eos_token_id = None
    # generate() fills unset keys from model.generation_config: make it this run's config so both samplers agree.
    model.generation_config = gen_cfg
    config = SamplerConfig.from_generation_config(gen_cfg, compile=args.compile)
    sampler = BlockDiffusionSampler(model, config)
    vocab = model.config.get_text_config().vocab_size
    params = sum(p.numel() for p in model.parameters())

    rows = []
    for batch in args.batch_sizes:
        rows.extend(run_batch(model, tokenizer, gen_cfg, sampler, args, batch, vocab, device))
    machine = machine_name(device)
    title = (f"sampler benchmark: {name} ({params / 1e6:.1f}M params, vocab {vocab}, canvas "
             f"{model.config.canvas_length}, {config.max_denoising_steps} steps max) - {machine}, {dtype}, "
             f"compile={sampler.compiled}")
    print_table(rows, title)
    load_avg = os.getloadavg()[0]
    print(f"1-minute load average at the end: {load_avg:.1f} on {os.cpu_count()} cores")
    out = args.out or RESULTS / f"sampler-{name}-{device.type}.json"
    atomic_write_json(out, {
        "machine": machine, "device": device.type, "dtype": str(dtype), "torch": torch.__version__,
        "load_average_1m": load_avg, "model": name, "params": params, "vocab_size": vocab,
        "canvas_length": model.config.canvas_length, "prompts": args.prompts, "prompt_length": args.prompt_length,
        "max_new_tokens": args.max_new_tokens or model.config.canvas_length, "eos": use_eos,
        "compiled": sampler.compiled, "static_cache": sampler.static_cache, "repeats": args.repeats,
        "sampler": {k: v for k, v in vars(config).items()}, "rows": rows,
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
