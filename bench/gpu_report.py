"""The GPU script's table (bench/gpu.sh): sudoku9 SFT, our sampler vs the reference vs AR on bench100m, FP8 real-GEMM
decode vs bf16, NVFP4 CUDA vs the CPU emulation; one table, one JSON.

    python -m bench.gpu_report --run <run_dir> --sampler <sampler json> --nvfp4 <nvfp4 json> --out gpu.json

Reads what the steps wrote (a missing file = that step did not finish, shown as such): <run>/sft/verify.json and
training.json (bf16), <run>/quantize/fp8/verify.json (its gate runs real FP8 GEMMs on Hopper+:
`fp8_gemm_linears` > 0), the bench.sampler JSON, the bench.quant_error --compare-cuda JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dg_pipeline.core.io import atomic_write_json


def read(path: Path | None) -> dict | None:
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def f(value, spec: str = ".3f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def sft_rows(run: Path) -> list[tuple[str, str, str]]:
    gate, training = read(run / "sft" / "verify.json"), read(run / "sft" / "training.json")
    if gate is None:
        return [("sudoku9 SFT", "not finished", str(run / "sft"))]
    by_source = gate.get("by_source") or {}
    solved = ", ".join(f"{s} {c['accuracy']:.3f} (AR {f(c.get('ar_accuracy'))})" for s, c in by_source.items())
    steps = training.get("steps") if training else None
    seconds = training.get("wall_seconds") if training else None
    return [
        ("sudoku9 SFT", f"{steps} steps in {f(seconds, '.0f', ' s')}", f"final train loss {f(training and training.get('final_train_loss'))}"),
        ("sudoku9 solve rate", f"{gate['accuracy']:.3f} (AR {f(gate.get('ar_accuracy'))})", solved or "-"),
        ("sudoku9 steps/canvas, tokens/step", f"{f(gate.get('steps_per_canvas'), '.1f')}, {f(gate.get('tokens_per_step'), '.2f')}",
         f"TTFT {f(gate.get('ttft_s'), '.4f', ' s')} (AR {f(gate.get('ar_ttft_s'), '.4f', ' s')})"),
        ("sudoku9 speedup vs AR @1", f"{f(gate.get('speedup_vs_ar'), '.2f', 'x')}",
         f">= {f(gate.get('speedup_vs_ar_lower_bound'), '.2f', 'x')} at 95%"),
    ]


def fp8_rows(run: Path) -> list[tuple[str, str, str]]:
    bf16, fp8 = read(run / "sft" / "verify.json"), read(run / "quantize" / "fp8" / "verify.json")
    if bf16 is None or fp8 is None:
        return [("FP8 real-GEMM decode vs bf16", "not finished", str(run / "quantize" / "fp8"))]
    rows = [("FP8 GEMM linears", str(fp8.get("fp8_gemm_linears")), "0 = fake quantization only (no cc >= 8.9 GPU)")]
    for label, key in (("adaptive", None), ("fixed steps", "fixed_step_benchmark")):
        a = bf16 if key is None else (bf16.get(key) or {})
        b = fp8 if key is None else (fp8.get(key) or {})
        tps = "tokens_per_second" if key is None else "tokens_per_second_median"
        ratio = b.get(tps) / a.get(tps) if a.get(tps) and b.get(tps) else None
        rows.append((f"FP8 vs bf16 tokens/s @1 ({label})", f"{f(b.get(tps), ',.1f')} vs {f(a.get(tps), ',.1f')}",
                     f"{f(ratio, '.2f', 'x')}; accuracy {f(b.get('accuracy'))} vs {f(a.get('accuracy'))}"))
    return rows


def sampler_rows(result: dict | None) -> list[tuple[str, str, str]]:
    if result is None:
        return [("bench.sampler", "not finished", "")]
    rows = []
    for r in result["rows"]:
        extra = ""
        if r["method"] == "ours":
            extra = (f"vs reference {f(r.get('speedup_vs_reference'), '.2f', 'x')}, vs AR "
                     f"{f(r.get('speedup_vs_ar'), '.2f', 'x')}, same tokens {r.get('same_tokens_as_reference')}")
        rows.append((f"{result['model']} {result['dtype'].replace('torch.', '')} batch {r['batch']}: {r['method']}",
                     f"{r['tokens_per_s']:,.1f} tok/s", extra))
    return rows


def nvfp4_rows(result: dict | None) -> list[tuple[str, str, str]]:
    if result is None:
        return [("NVFP4 CUDA vs CPU emulation", "not finished", "")]
    if not result.get("available"):
        return [("NVFP4 CUDA vs CPU emulation", "no GPU on this host", "")]
    return [(f"NVFP4 CUDA vs CPU emulation ({c['case']})", f"max |diff| {c['max_abs_diff']:.3g}",
             f"{c['differing']} elements differ") for c in result["cases"]]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="the sudoku9 run dir (sft, quantize/fp8)")
    p.add_argument("--sampler", type=Path, help="bench.sampler JSON")
    p.add_argument("--nvfp4", type=Path, help="bench.quant_error --compare-cuda JSON")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--title", default="GPU script")
    args = p.parse_args(argv)
    sampler, nvfp4 = read(args.sampler), read(args.nvfp4)
    rows = sft_rows(args.run) + sampler_rows(sampler) + fp8_rows(args.run) + nvfp4_rows(nvfp4)
    table = Table(title=args.title)
    for col in ("what", "value", "detail"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console(width=180).print(table)
    record = {"rows": [dict(zip(("what", "value", "detail"), r)) for r in rows],
              "sft": read(args.run / "sft" / "verify.json"), "fp8": read(args.run / "quantize" / "fp8" / "verify.json"),
              "sampler": sampler, "nvfp4": nvfp4}
    atomic_write_json(args.out, record)
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
