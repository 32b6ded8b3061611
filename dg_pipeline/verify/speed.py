"""Speed figures that hold on a shared machine.

The batch-1 figures (tokens/s, speedup_vs_ar, time to first token) come from `rounds` rounds over the same examples;
in each round every decoder decodes them once, in an order that rotates from round to round, so load from other jobs
falls on all decoders alike. Per round the speedup is the diffusion / AR tokens/s ratio of that round. The gate
reports the median over rounds with the spread (min, quartiles, max) and checks `verify.min_speedup` against a
distribution-free lower confidence bound of the median speedup: the k-th smallest round ratio, k the largest order
statistic below the median with the requested confidence (5 rounds give the minimum at 96.9%).
"""

from __future__ import annotations

import math
import os
import statistics
from typing import Mapping, Sequence

from rich.progress import Progress

from dg_pipeline.verify.passes import TOKENS_PER_SECOND_DEFINITION, DecodePass, Generate, run_pass

SPEEDUP_DEFINITION = (
    "median over interleaved rounds of (diffusion tokens/s / AR tokens/s), both at batch 1 on the same examples and "
    "weights; tokens/s = " + TOKENS_PER_SECOND_DEFINITION
)


def median_lower_bound_rank(n: int, confidence: float) -> int | None:
    """The largest k (1-based) with P(k-th smallest of n <= median) >= confidence, i.e. P(Binomial(n, 1/2) >= k) >=
    confidence; None when even the minimum does not reach it (too few rounds)."""
    best = None
    for k in range(1, n + 1):
        tail = sum(math.comb(n, j) for j in range(k, n + 1)) / 2**n
        if tail >= confidence:
            best = k
    return best


def rounds_needed(confidence: float) -> int:
    """The fewest rounds whose minimum bounds the median at `confidence` (1 - 2^-n >= confidence)."""
    return max(1, math.ceil(math.log2(1.0 / (1.0 - confidence)))) if confidence > 0 else 1


def median_lower_bound(values: Sequence[float], confidence: float) -> float | None:
    """Distribution-free one-sided lower confidence bound of the median of `values`' distribution."""
    rank = median_lower_bound_rank(len(values), confidence)
    return None if rank is None else sorted(values)[rank - 1]


def spread(values: Sequence[float]) -> dict[str, float] | None:
    """min, quartiles, max and the relative range (max - min) / median of per-round values."""
    if not values:
        return None
    ordered = sorted(values)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else (ordered[0],) * 3
    median = statistics.median(ordered)
    return {"min": ordered[0], "q1": q1, "median": median, "q3": q3, "max": ordered[-1],
            "relative_range": (ordered[-1] - ordered[0]) / median if median else None}


def interleaved_rounds(
    decoders: Mapping[str, Generate],
    examples: Sequence,
    rounds: int,
    tokenizer,
    progress: Progress | None = None,
    eos_token_ids: Sequence[int] = (),
) -> dict[str, list[DecodePass]]:
    """{decoder name: one batch-1 DecodePass per round}; round r starts with decoder r mod len(decoders). A decoder
    with a `restart()` (the block sampler's seeds) restarts every round, so each round repeats the same work."""
    names = list(decoders)
    passes: dict[str, list[DecodePass]] = {name: [] for name in names}
    task = progress.add_task("speed     batch 1, interleaved", total=rounds * len(names)) if progress else None
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            restart = getattr(decoders[name], "restart", None)
            if restart is not None:
                restart()
            passes[name].append(run_pass(decoders[name], examples, 1, tokenizer, eos_token_ids=eos_token_ids))
            if progress is not None:
                progress.advance(task)
    return passes


def speed_summary(passes: Mapping[str, list[DecodePass]], confidence: float, diffusion: str = "diffusion",
                  ar: str = "ar") -> dict:
    """The speed record: per decoder its per-round tokens/s and median, time to first token; the per-round speedup
    of `diffusion` over `ar`, its median, spread and lower confidence bound."""
    out: dict = {"rounds": len(next(iter(passes.values()), [])), "confidence": confidence,
                 "definition": SPEEDUP_DEFINITION, "load_average_1m": os.getloadavg()[0], "decoders": {}}
    for name, runs in passes.items():
        tps = [p.tokens_per_second for p in runs]
        ttft = [t for p in runs for t in p.first_token_seconds]
        first = runs[0]
        out["decoders"][name] = {
            "tokens_per_second": tps,
            "tokens_per_second_median": statistics.median(tps) if tps else None,
            "tokens_per_second_spread": spread(tps),
            "ttft_s_median": statistics.median(ttft) if ttft else None,
            "tokens_per_step": first.tokens_per_forward,
            "steps_per_canvas": first.mean_denoising_steps,
            "positions_per_token": first.positions_per_token,
            "examples": len(first.sequences),
        }
    if diffusion in passes and ar in passes:
        ratios = [d.tokens_per_second / a.tokens_per_second if a.tokens_per_second else None
                  for d, a in zip(passes[diffusion], passes[ar])]
        finite = [r for r in ratios if r is not None]
        out["speedup_vs_ar"] = ratios
        out["speedup_vs_ar_median"] = statistics.median(finite) if finite else None
        out["speedup_vs_ar_spread"] = spread(finite)
        out["speedup_vs_ar_lower_bound"] = median_lower_bound(finite, confidence) if confidence > 0 else None
    return out
