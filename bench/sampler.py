"""Benchmark: our block-diffusion sampler vs the reference `generate` vs autoregressive decoding, same checkpoint.

    python -m bench.sampler --init sudoku4                       # random-init named config (CPU)
    python -m bench.sampler --init bench100m --batch-sizes 1 --repeats 1 --warmup 0
    python -m bench.sampler --model runs/x/sft/model             # a trained model dir
    python -m bench.sampler --init bench100m --device cuda       # GPU host: bf16, compiled sampler (compile=auto)

    python -m bench.sampler --model runs/x/sft/model --prompts sudoku4 --fixed-steps 16   # vLLM's fixed-step mode

Per batch size: `--warmup` untimed calls per method (compilation, CUDA graphs, lazy init), then `--repeats` rounds
with the methods interleaved in a rotating order (so load from other jobs hits them alike). Reports wall time (median,
min, max over rounds), this process's CPU time (less sensitive to other jobs on a shared CPU), tokens/s (the gate's
definition: dg_pipeline.verify.passes.TOKENS_PER_SECOND_DEFINITION), decoder forwards, tokens committed per step,
steps per canvas, canvas positions per token, time to first token, and our speedup over the reference and over AR
(median of the per-round ratios, with their min and max); checks our tokens equal the reference's. `--fixed-steps N`
runs exactly N denoising steps per block with no adaptive stop (vLLM's published DiffusionGemma measurement: 16).
Random-init weights never get confident, so every block runs all max_denoising_steps; a trained model stops early.
Writes bench/results/sampler-<model>-<device>[-fixed<N>].json.
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
from dg_pipeline.verify.passes import TOKENS_PER_SECOND_DEFINITION, useful_length
from dg_pipeline.verify.speed import spread

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
    p.add_argument("--prompt-count", type=int, default=8,
                   help="prompts each timed call decodes, in batches of the batch size (one prompt's step count "
                        "is not representative at batch 1)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: one canvas")
    p.add_argument("--steps", type=int, default=None, help="max_denoising_steps (default: the checkpoint's, 48)")
    p.add_argument("--fixed-steps", type=int, default=None,
                   help="exactly N denoising steps per block, no adaptive stop (vLLM's benchmark mode: 16)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (methods interleaved, order rotating)")
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


def timed(fn, device) -> tuple[GenerationResult, float, float]:
    """(result, wall s, CPU s of this process)."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def generated_tokens(result: GenerationResult, eos_id: int | None, pad_id: int | None) -> int:
    """The gate's generated tokens: up to and including each row's first EOS."""
    return sum(useful_length(row, (eos_id,), pad_id) for row in result.sequences.tolist())


def prompt_batch(args, tokenizer, batch: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    if args.prompts == "random":
        ids = torch.randint(6, vocab, (batch, args.prompt_length), generator=torch.Generator().manual_seed(args.seed))
        return ids, torch.ones_like(ids, dtype=torch.bool)
    size = int(args.prompts[-1])
    boards = generate_boards(size, batch, *((4, 10) if size == 4 else (30, 45)), seed=args.seed)
    return left_padded_prompts(sudoku_examples(boards, tokenizer), tokenizer.pad_token_id)


def merged(results: list[GenerationResult]) -> GenerationResult:
    """One result for several generate() calls (one per chunk of prompts)."""
    width = max(r.sequences.shape[1] for r in results)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    ttft = [r.first_token_s for r in results if r.first_token_s is not None]
    positions = [r.positions_evaluated for r in results if r.positions_evaluated is not None]
    return GenerationResult(
        torch.cat([pad(r.sequences) for r in results]), torch.cat([r.decoder_forwards for r in results]),
        torch.cat([r.committed_tokens for r in results]), [s for r in results for s in r.steps_per_block],
        sum(r.wall_time_s for r in results), first_token_s=statistics.mean(ttft) if ttft else None,
        positions_evaluated=sum(positions) if positions else None)


def run_batch(model, tokenizer, gen_cfg, sampler, args, batch: int, vocab: int, device) -> list[dict]:
    ids, mask = prompt_batch(args, tokenizer, max(batch, args.prompt_count), vocab)
    chunks = [(ids[i : i + batch].to(device), mask[i : i + batch].to(device)) for i in range(0, ids.shape[0], batch)]
    max_new = args.max_new_tokens or model.config.canvas_length
    eos = tuple(sampler.config.eos_token_ids)

    def reference(ids, mask):
        torch.manual_seed(args.seed)
        out = model.generate(ids, attention_mask=mask.long(), generation_config=gen_cfg, max_new_tokens=max_new)
        new = out.sequences[:, ids.shape[1]:].cpu()
        committed = (new != gen_cfg.pad_token_id).sum(-1)
        forwards = torch.round(committed / out.tokens_per_forward.cpu()).long()
        return GenerationResult(new, forwards, committed, [], 0.0)

    def over_chunks(fn):
        return lambda: merged([fn(ids, mask) for ids, mask in chunks])

    calls = {
        "ours": over_chunks(lambda ids, mask: sampler.generate(ids, mask, max_new_tokens=max_new, seed=args.seed)),
        "reference": over_chunks(reference),
        "ar": over_chunks(lambda ids, mask: ar_generate(model, ids, mask, max_new_tokens=max_new, eos_token_ids=eos)),
    }
    calls = {m: calls[m] for m in args.methods}
    for _ in range(args.warmup):
        for fn in calls.values():
            fn()
    names = list(calls)
    runs: dict[str, list] = {m: [] for m in calls}
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            runs[name].append(timed(calls[name], device))

    eos_id = eos[0] if eos else None
    rows = []
    for name, samples in runs.items():
        result = samples[0][0]
        wall = [s[1] for s in samples]
        cpu = [s[2] for s in samples]
        tokens = generated_tokens(result, eos_id, gen_cfg.pad_token_id)
        ttft = [s[0].first_token_s for s in samples if s[0].first_token_s is not None]
        rows.append({
            "method": name,
            "batch": batch,
            "wall_s": wall,
            "wall_s_median": statistics.median(wall),
            "wall_s_min": min(wall),
            "wall_s_max": max(wall),
            "cpu_s_median": statistics.median(cpu),
            "tokens": tokens,
            "tokens_per_s": tokens / statistics.median(wall),
            "decoder_forwards": float(result.decoder_forwards.float().mean()),
            "tokens_per_forward": float(result.tokens_per_forward.mean()),  # = tokens committed per step
            "mean_steps_per_block": result.mean_denoising_steps if name == "ours" else None,  # = steps per canvas
            "positions_per_token": (result.positions_evaluated / tokens
                                    if result.positions_evaluated is not None and tokens else None),
            "ttft_s_median": statistics.median(ttft) if ttft else None,
        })
    by = {r["method"]: r for r in rows}

    def ratios(slow: str, fast: str) -> list[float]:
        # per round: the slower method's wall time over ours (same tokens asked for in both)
        return [s[1] / f[1] * (generated_tokens(f[0], eos_id, gen_cfg.pad_token_id)
                                 / max(generated_tokens(s[0], eos_id, gen_cfg.pad_token_id), 1))
                for s, f in zip(runs[slow], runs[fast])]

    if "ours" in by and "reference" in by:
        ours, ref = by["ours"], by["reference"]
        per_round = [s[1] / f[1] for s, f in zip(runs["reference"], runs["ours"])]
        ours["speedup_vs_reference"] = statistics.median(per_round)
        ours["speedup_vs_reference_spread"] = spread(per_round)
        ours["cpu_speedup_vs_reference"] = ref["cpu_s_median"] / max(ours["cpu_s_median"], 1e-9)
        same = torch.equal(runs["ours"][0][0].sequences, runs["reference"][0][0].sequences)
        ours["same_tokens_as_reference"] = bool(same)
        ref["mean_steps_per_block"] = ours["mean_steps_per_block"] if ours["same_tokens_as_reference"] else None
    if "ours" in by and "ar" in by:
        per_round = ratios("ar", "ours")  # tokens/s ratio per round
        by["ours"]["speedup_vs_ar"] = statistics.median(per_round)
        by["ours"]["speedup_vs_ar_spread"] = spread(per_round)
    return rows


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU, {os.cpu_count()} cores ({cpu}), {torch.get_num_threads()} torch threads"


def print_table(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    columns = ("batch", "method", "wall s (med)", "wall s (min-max)", "CPU s", "tokens/s", "fwd/row", "tok/step",
               "steps/canvas", "pos/token", "TTFT ms", "vs ref (min-max)", "CPU vs ref", "vs AR (min-max)",
               "same tokens")
    for col in columns:
        table.add_column(col, justify="left" if col == "method" else "right")

    def fmt(v, spec=".2f"):
        return "" if v is None else format(v, spec) if isinstance(v, float) else str(v)

    def with_spread(r, key):
        s = r.get(f"{key}_spread")
        return "" if r.get(key) is None else f"{r[key]:.2f} ({s['min']:.2f}-{s['max']:.2f})"

    for r in rows:
        ttft = None if r["ttft_s_median"] is None else r["ttft_s_median"] * 1e3
        table.add_row(str(r["batch"]), r["method"], fmt(r["wall_s_median"], ".3f"),
                      f"{r['wall_s_min']:.3f}-{r['wall_s_max']:.3f}", fmt(r["cpu_s_median"], ".3f"),
                      fmt(r["tokens_per_s"], ".1f"), fmt(r["decoder_forwards"], ".1f"), fmt(r["tokens_per_forward"]),
                      fmt(r["mean_steps_per_block"], ".1f"), fmt(r["positions_per_token"]), fmt(ttft, ".1f"),
                      with_spread(r, "speedup_vs_reference"), fmt(r.get("cpu_speedup_vs_reference")),
                      with_spread(r, "speedup_vs_ar"), fmt(r.get("same_tokens_as_reference")))
    Console(width=220).print(table)


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = resolve_dtype(args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, name = load(args, device, dtype)
    use_eos = args.eos if args.eos is not None else args.model is not None
    steps = args.fixed_steps or args.steps
    # Fixed steps: the stop rule needs the argmax canvas to repeat `stability_threshold` times, impossible within N
    # steps when the threshold is N (the gate's fixed-step sweep uses the same settings).
    fixed = {"stability_threshold": args.fixed_steps} if args.fixed_steps else {}
    gen_cfg = generation_config(tokenizer, base=model.generation_config if args.model else None,
                                max_denoising_steps=steps, **fixed)
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
    mode = f"fixed {args.fixed_steps} steps" if args.fixed_steps else f"{config.max_denoising_steps} steps max"
    title = (f"sampler benchmark: {name} ({params / 1e6:.1f}M params, vocab {vocab}, canvas "
             f"{model.config.canvas_length}, {mode}) - {machine}, {dtype}, compile={sampler.compiled}, "
             f"{args.repeats} rounds")
    print_table(rows, title)
    load_avg = os.getloadavg()[0]
    print(f"1-minute load average at the end: {load_avg:.1f} on {os.cpu_count()} cores")
    suffix = f"-fixed{args.fixed_steps}" if args.fixed_steps else ""
    out = args.out or RESULTS / f"sampler-{name}-{device.type}{suffix}.json"
    atomic_write_json(out, {
        "machine": machine, "device": device.type, "dtype": str(dtype), "torch": torch.__version__,
        "load_average_1m": load_avg, "model": name, "params": params, "vocab_size": vocab,
        "canvas_length": model.config.canvas_length, "prompts": args.prompts, "prompt_length": args.prompt_length,
        "prompt_count": args.prompt_count,
        "max_new_tokens": args.max_new_tokens or model.config.canvas_length, "eos": use_eos,
        "compiled": sampler.compiled, "static_cache": sampler.static_cache, "repeats": args.repeats,
        "fixed_steps": args.fixed_steps, "tokens_per_second_definition": TOKENS_PER_SECOND_DEFINITION,
        "sampler": {k: v for k, v in vars(config).items()}, "rows": rows,
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
