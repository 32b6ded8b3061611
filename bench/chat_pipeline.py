"""Benchmark (issue 14): a Gemma 4 chat checkpoint through the pipeline: stop ids, parity, chat SFT, quantize gate.

    python -m bench.chat_pipeline [--out DIR] [--layers 30] [--steps 300] [--code ROOT] [--skip-parity]

Builds, locally and from a seed (no downloads):
- a Gemma 4 causal LM in the released 26B-A4B layout at reduced width (dg_pipeline.model.tiny_gemma4:
  RELEASED_LAYOUT_TEXT, `--layers` of the 5 sliding : 1 full pattern, 128 experts top-8) with the Gemma-4-like chat
  tokenizer and template (data/tokenizer.py) and Gemma 4's stop list [1, 106] (<eos>, <turn|>);
- a template-faithful chat set: a system turn and a word to repeat, the answer is the word (train/eval prompts
  disjoint).
Then runs `python -m dg_pipeline` stage=base, sft, quantize (fp8, nvfp4) on it with the code at `--code` (default:
this checkout; pass another checkout, e.g. the main branch, to measure "before") and reads their verify.json /
quant.json. Also (unless --skip-parity) the parity figures of a conversion at 6 and 30 layers: the whole-forward
max |Δ logit| (the old check) and the teacher-forced figures (dg_pipeline.model.parity), fp32 and bf16, with the
converted model on transformers' eager experts kernel (the source runs grouped_mm).
Prints tables and writes bench/results/chat_pipeline[-<tag>].json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from dg_pipeline.core.io import atomic_write_json
from dg_pipeline.data.tokenizer import CHAT_EOS_IDS
from dg_pipeline.model.tiny_gemma4 import RELEASED_LAYOUT_TEXT, build_tiny_gemma4, save_tiny_gemma4, tiny_gemma4_config

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
console = Console(width=140)
SYSTEM = "Repeat the user's word."


def released_layout(layers: int) -> dict:
    return dict(RELEASED_LAYOUT_TEXT, num_hidden_layers=layers, layer_types=RELEASED_LAYOUT_TEXT["layer_types"][:layers])


def write_chat_set(path: Path, n: int, seed: int = 0) -> Path:
    """`n` rows {"messages": [system, user: a word, assistant: the word]} with distinct words."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5))))
    rows = [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": w},
                          {"role": "assistant", "content": w}]} for w in sorted(words)]
    rng.shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_stage(code: Path, run_dir: Path, *overrides: str) -> tuple[int, float, str]:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "WANDB_MODE": "offline"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dg_pipeline", f"run_dir={run_dir}", *overrides], cwd=code, env=env,
                          capture_output=True, text=True)
    return done.returncode, time.perf_counter() - started, (done.stdout + done.stderr)[-3000:]


def read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def pipeline(args, out: Path) -> dict:
    g4 = save_tiny_gemma4(out / "gemma4", chat=True, seed=0, **released_layout(args.layers))
    data = write_chat_set(out / "chat.jsonl", args.rows)
    run_dir = out / "run"
    common = [
        "model=chat", "data=chat", "trainer=cpu", "logger=none", "device=cpu", f"model.base={g4}",
        "model.canvas_length=8", "model.dtype=float32", f"data.train_path={data}", "data.n_val=16",
        f"data.n_eval={args.n_eval}", "sampler.max_new_tokens=8", "verify.speed_examples=4", "verify.plots=false",
        "verify.batch_size=16", f"sampler.max_denoising_steps={args.denoising_steps}",
    ]
    result: dict = {"source_eos_token_id": json.loads((g4 / "generation_config.json").read_text())["eos_token_id"]}
    rc, seconds, log = run_stage(args.code, run_dir, "stage=base", *common)
    base = read(run_dir / "base" / "verify.json") or {}
    model_dir = run_dir / "base" / "model"
    result["base"] = {
        "rc": rc, "seconds": seconds, "passed": base.get("passed"),
        "config_eos": (read(model_dir / "config.json") or {}).get("text_config", {}).get("eos_token_id"),
        "generation_eos": (read(model_dir / "generation_config.json") or {}).get("eos_token_id"),
        "checks": {c["name"]: (c["value"], c["passed"]) for c in base.get("checks", [])},
        "log": None if rc == 0 else log,
    }
    train = [f"trainer.max_steps={args.steps}", "trainer.batch_size=16", "trainer.lr=3e-3", "trainer.warmup_steps=20",
             f"trainer.val_check_interval={args.steps}", "trainer.lora.enabled=false", "trainer.progress_bar=none"]
    rc, seconds, log = run_stage(args.code, run_dir, "stage=sft", *common, *train)
    sft = read(run_dir / "sft" / "verify.json") or {}
    result["sft"] = {"rc": rc, "seconds": seconds, **_gate(sft), "log": None if rc == 0 else log}
    result["sft"]["first_predictions"] = _predictions(run_dir / "sft")
    for fmt in ("fp8", "nvfp4"):
        rc, seconds, log = run_stage(args.code, run_dir, "stage=quantize", f"quant={fmt}", *common, *train,
                                     "calib.n_samples=32", "calib.batch_size=16", "quant.probe_prompts=8")
        gate = read(run_dir / "quantize" / fmt / "verify.json") or {}
        quant = read(run_dir / "quantize" / fmt / "quant.json") or {}
        result[f"quantize_{fmt}"] = {"rc": rc, "seconds": seconds, **_gate(gate),
                                     "logits_relative_error": quant.get("logits_relative_error"),
                                     "log": None if rc == 0 else log}
    return result


def _gate(record: dict) -> dict:
    return {
        "passed": record.get("passed"), "accuracy": record.get("accuracy"),
        "token_accuracy": record.get("token_accuracy"), "ar_accuracy": record.get("ar_accuracy"),
        "ar_token_accuracy": record.get("ar_token_accuracy"), "n_eval": record.get("n_eval"),
        "checks": {c["name"]: (c["value"], c["threshold"], c["passed"]) for c in record.get("checks", [])},
    }


def _predictions(stage_dir: Path, n: int = 4) -> list:
    path = stage_dir / "predictions.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    return [(r.get("prediction"), r.get("reference")) for r in rows]


@torch.no_grad()
def parity_figures() -> list[dict]:
    from dg_pipeline.model.convert import convert_gemma4, parity_probe
    from dg_pipeline.model.logits import encoder_causal_lm_logits
    from dg_pipeline.model.parity import logits_parity

    rows = []
    for layers in (6, 30):
        for dtype in (torch.float32, torch.bfloat16):
            text = dict(released_layout(layers), vocab_size=203)
            source = build_tiny_gemma4(tiny_gemma4_config(**text)).to(dtype)
            model = convert_gemma4(source, canvas_length=8)
            model.set_experts_implementation("eager")
            probe = parity_probe(source.config)
            figures = logits_parity(
                source, source.model.layers, lambda: source(input_ids=probe).logits,
                model, model.model.encoder.language_model.layers, lambda: encoder_causal_lm_logits(model, probe),
            )
            rows.append({"layers": layers, "dtype": str(dtype).removeprefix("torch."), **figures.as_record()})
    return rows


def print_tables(result: dict) -> None:
    if "parity" in result:
        table = Table(title="parity of a conversion (converted model on eager experts, source on grouped_mm)")
        for col in ("layers", "dtype", "old: max |Δ logit|", "free rel. err", "free routing diff", "layer rel. err",
                    "pinned max |Δ logit|", "routing diff (worst layer)"):
            table.add_column(col, justify="right")
        for r in result["parity"]:
            table.add_row(str(r["layers"]), r["dtype"], f"{r['free_max_abs_logit_diff']:.3g}",
                          f"{r['free_logits_relative_error']:.3g}", f"{r['free_routing_disagreement']:.3g}",
                          f"{r['layer_relative_error']:.2g}", f"{r['pinned_max_abs_logit_diff']:.2g}",
                          f"{r['routing_disagreement']:.3g}")
        console.print(table)
    if "base" in result:
        table = Table(title=f"chat pipeline ({result['code']})", show_header=True)
        for col in ("stage", "rc", "passed", "exact match", "token acc.", "AR exact", "logits err", "checks failed",
                    "s"):
            table.add_column(col)
        b = result["base"]
        table.add_row("base", str(b["rc"]), str(b["passed"]), f"eos config {b['config_eos']}",
                      f"gen {b['generation_eos']}", "", "", ", ".join(k for k, v in b["checks"].items() if not v[1]),
                      f"{b['seconds']:.0f}")
        for name in ("sft", "quantize_fp8", "quantize_nvfp4"):
            s = result[name]
            table.add_row(name, str(s["rc"]), str(s["passed"]), _f(s["accuracy"]), _f(s["token_accuracy"]),
                          _f(s["ar_accuracy"]), _f(s.get("logits_relative_error")),
                          ", ".join(k for k, v in s["checks"].items() if not v[2]), f"{s['seconds']:.0f}")
        console.print(table)


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/dg_chat_pipeline"))
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose dg_pipeline runs the stages")
    parser.add_argument("--tag", default="", help="suffix of the results file (e.g. before)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--n-eval", type=int, default=32)
    parser.add_argument("--denoising-steps", type=int, default=8, help="sampler.max_denoising_steps of every gate")
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--skip-pipeline", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result = {"code": str(args.code), "layers": args.layers, "steps": args.steps, "rows": args.rows,
              "threads": torch.get_num_threads(), "chat_eos_ids": list(CHAT_EOS_IDS)}
    if not args.skip_parity:
        result["parity"] = parity_figures()
    if not args.skip_pipeline:
        args.out.mkdir(parents=True, exist_ok=True)
        result.update(pipeline(args, args.out))
    print_tables(result)
    name = f"chat_pipeline{'-' + args.tag if args.tag else ''}.json"
    atomic_write_json(RESULTS / name, result)
    console.print(f"wrote {RESULTS / name}")
    return result


if __name__ == "__main__":
    main()
