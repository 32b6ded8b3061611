"""Benchmark: bytes of the exported checkpoint, FP8 and NVFP4 vs bf16: the quantized linears alone and the whole
checkpoint (weights files).

    python -m bench.export_size [--shape sudoku4 bench100m]     random-init models, exported in a temp dir
    python -m bench.export_size --run-dir runs/demo             the bundles under <run_dir>/export/

Random-init models are quantized with the quantize stage's recipes and calibration (on random tokens: sizes do not
depend on the weights' values) and exported with dg_pipeline.export; NVFP4 uses the CPU emulation off-GPU.
For a run dir, the bf16 reference is its `export/bf16` bundle when there is one, else each quantized bundle's own
tensors counted at 2 bytes per weight element (the same thing: unquantized tensors are bf16 in every bundle).
Prints a table and writes bench/results/export_size.json (export_size_<run dir name>.json for --run-dir).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from dg_pipeline.core.io import atomic_write_json
from dg_pipeline.export.formats import CheckpointTensors, quantized_format, read_quant_config

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FORMATS = ("fp8", "nvfp4")
BF16_BYTES = 2
# Vocabulary of the bench100m shape (conf/model/bench100m.yaml): a realistic embedding table.
SHAPE_VOCAB = {"bench100m": 32768}
SHAPE_CANVAS = {"sudoku4": 32, "bench100m": 256}


def checkpoint_sizes(export_dir: Path) -> dict:
    """Bytes of the quantized linears (weights + their scales), of the same linears in bf16, and of the files."""
    tensors = CheckpointTensors(export_dir)
    linear_bytes = linear_bf16_bytes = n_linears = 0
    logical_bf16 = 0  # the whole checkpoint if every quantized weight were bf16
    for module, leaves in tensors.modules().items():
        fmt = quantized_format(leaves)
        if fmt is None:
            logical_bf16 += sum(t.numel * BF16_BYTES if t.dtype.is_floating_point else t.nbytes
                                for t in leaves.values())
            continue
        weight = leaves["weight"]
        elements = weight.numel * fmt.inputs_per_byte
        n_linears += 1
        linear_bytes += sum(t.nbytes for t in leaves.values() if not t.name.endswith(("k_scale", "v_scale")))
        linear_bf16_bytes += elements * BF16_BYTES
        logical_bf16 += elements * BF16_BYTES
    files = sum((export_dir / f).stat().st_size for f in tensors.files)
    quant = read_quant_config(export_dir) or {}
    return {
        "quant_algo": quant.get("quant_algo"),
        "quantized_linears": n_linears,
        "linear_bytes": linear_bytes,
        "linear_bf16_bytes": linear_bf16_bytes,
        "checkpoint_bytes": files,
        "checkpoint_bf16_bytes_estimate": logical_bf16,
    }


def row(source: str, fmt: str, sizes: dict, bf16_checkpoint: int | None, seconds: float | None = None) -> dict:
    bf16_total = bf16_checkpoint or sizes["checkpoint_bf16_bytes_estimate"]
    return {
        "source": source,
        "format": fmt,
        **sizes,
        "bf16_checkpoint_bytes": bf16_total,
        "linear_ratio": sizes["linear_bytes"] / sizes["linear_bf16_bytes"] if sizes["linear_bf16_bytes"] else None,
        "checkpoint_ratio": sizes["checkpoint_bytes"] / bf16_total if bf16_total else None,
        "export_seconds": None if seconds is None else round(seconds, 2),
    }


def measure_shape(shape: str, console: Console) -> list[dict]:
    from dg_pipeline.data.tokenizer import build_board_tokenizer
    from dg_pipeline.export import export_quantized, export_unquantized, release_generation_config
    from dg_pipeline.export.sample import quantized_random_model
    from dg_pipeline.model import build_model

    tokenizer = build_board_tokenizer()
    canvas, vocab = SHAPE_CANVAS.get(shape, 32), SHAPE_VOCAB.get(shape)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with console.status(f"{shape}: bf16 export"):
            model = build_model(shape, tokenizer, canvas, vocab_size=vocab)
            export_unquantized(model, tokenizer, Path(tmp) / "bf16", release_generation_config(model, tokenizer),
                               torch.bfloat16)
            bf16_bytes = checkpoint_sizes(Path(tmp) / "bf16")["checkpoint_bytes"]
            del model
        for fmt in FORMATS:
            with console.status(f"{shape}: {fmt} calibration + export"):
                model = quantized_random_model(shape, fmt, tokenizer, canvas, vocab_size=vocab)
                started = time.perf_counter()
                out = Path(tmp) / fmt
                out.mkdir()
                export_quantized(model, tokenizer, out, release_generation_config(model, tokenizer), torch.bfloat16)
                seconds = time.perf_counter() - started
                del model
            rows.append(row(f"{shape} (random init)", fmt, checkpoint_sizes(out), bf16_bytes, seconds))
    return rows


def measure_run_dir(run_dir: Path) -> list[dict]:
    root = run_dir / "export"
    bundles = sorted(p for p in root.glob("*") if (p / "config.json").exists()) if root.is_dir() else []
    if not bundles:
        raise SystemExit(f"no exported bundles under {root}; run `python -m dg_pipeline stage=export` first")
    bf16 = next((b for b in bundles if read_quant_config(b) is None), None)
    bf16_bytes = checkpoint_sizes(bf16)["checkpoint_bytes"] if bf16 is not None else None
    return [row(str(b), b.name, checkpoint_sizes(b), bf16_bytes) for b in bundles if read_quant_config(b) is not None]


def mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.2f}"


def print_table(rows: list[dict], console: Console) -> None:
    table = Table(title="exported bytes vs bf16 (MB = 1e6 bytes; linears = the quantized linears with their scales)",
                  title_justify="left")
    for header in ("model", "format", "linears", "linears MB", "as bf16", "ratio", "checkpoint MB", "as bf16",
                   "ratio"):
        table.add_column(header, justify="left" if header in ("model", "format") else "right")
    for r in rows:
        table.add_row(r["source"], r["quant_algo"] or r["format"], str(r["quantized_linears"]), mb(r["linear_bytes"]),
                      mb(r["linear_bf16_bytes"]), f"{r['linear_ratio']:.3f}", mb(r["checkpoint_bytes"]),
                      mb(r["bf16_checkpoint_bytes"]), f"{r['checkpoint_ratio']:.3f}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, help="measure the bundles of this run instead of random-init models")
    parser.add_argument("--shape", nargs="+", default=["sudoku4", "bench100m"], help="named shapes to measure")
    args = parser.parse_args()
    console = Console(width=None if Console().is_terminal else 120)
    rows = measure_run_dir(args.run_dir) if args.run_dir else [r for s in args.shape for r in measure_shape(s, console)]
    print_table(rows, console)
    results = RESULTS_DIR / (f"export_size_{args.run_dir.resolve().name}.json" if args.run_dir else "export_size.json")
    atomic_write_json(results, {
        "benchmark": "export_size",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"{'cuda' if torch.cuda.is_available() else 'cpu'}",
        "rows": rows,
    })
    console.print(f"wrote {results}")


if __name__ == "__main__":
    main()
