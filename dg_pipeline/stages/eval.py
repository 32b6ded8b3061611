"""Stage `eval`: run the verification gate on a model dir -> <run_dir>/eval/verify.json (+ predictions, plots).

    python -m dg_pipeline stage=eval [input=<dir>] [data.eval_path=<file>] run_dir=<dir>

- model: `input=`, else <run_dir>/sft/model. Any dir the pipeline writes (dg_pipeline.export.load_for_eval): a model
  dir, a quantize output (fake-quantized, as its gate ran it) or an export of any format (FP8, NVFP4, NVFP4
  experts-only: weights dequantized; bf16), its manifest verified first where it has one;
- examples: data.eval_path (Kaggle CSV / board JSONL for data.kind=sudoku, prompt/completion or messages JSONL
  for data.kind=chat; the first verify.n_eval / data.n_eval rows), else the run's eval split (load_splits:
  generated boards under <run_dir>/data/, reused when they exist);
- reference: the dir's own verify.json (a quantize output, an export) or the one next to it (e.g.
  <run_dir>/sft/verify.json for <run_dir>/sft/model) when there is one, so
  verify.max_accuracy_drop can hold an evaluation to its training-time gate; verify.reference overrides it.
A failed check raises GateFailed after verify.json is written (the entry point exits 1).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console

from dg_pipeline.core import RunDir, read_json
from dg_pipeline.data import chat_examples, load_splits, read_boards, read_chat_jsonl, sudoku_examples
from dg_pipeline.export import load_for_eval
from dg_pipeline.stages.base import resolve_device
from dg_pipeline.verify import run_gate

STAGE = "eval"
console = Console()


def run(cfg: DictConfig) -> dict:
    rd = RunDir.from_cfg(cfg)
    input_dir = rd.resolve_input(STAGE, cfg.get("input"))
    device = resolve_device(str(cfg.get("device", "auto")))
    with console.status(f"eval: loading {input_dir}"):
        loaded = load_for_eval(input_dir, dtype=str(cfg.model.dtype), device=device)
    examples = eval_examples(cfg, loaded.tokenizer, rd)
    console.print(f"[bold]eval[/]: {len(examples)} examples, {loaded.kind} {input_dir} on {device}")
    reference = gate_record(input_dir / "verify.json") or provider_record(input_dir)
    return run_gate(loaded.model, loaded.tokenizer, examples, cfg, STAGE, input_dir, rd.stage(STAGE),
                    reference=reference, simulated=loaded.simulated, extra={"loaded_as": loaded.kind})


def eval_examples(cfg: DictConfig, tokenizer, rd: RunDir) -> list:
    """data.eval_path read directly (no training data is touched), else the run's eval split."""
    data = cfg.data
    path = data.get("eval_path")
    limit = cfg.verify.get("n_eval") or data.get("n_eval")
    if not path:
        return load_splits(data, tokenizer, rd, int(cfg.seed)).eval
    if str(data.kind) == "sudoku":
        return sudoku_examples(read_boards(path, data.get("size"), limit=limit), tokenizer)
    records = read_chat_jsonl(path, limit=limit)
    return chat_examples(records, tokenizer, data.get("max_prompt_length"), bool(data.get("chat_template", True)))


def gate_record(path: Path) -> dict | None:
    """The task-gate record at `path` (a verify.json) with its `path`, or None when absent or not a task gate
    (stage=base checks weights, not a task: no accuracy, no reference)."""
    path = Path(path)
    if not path.is_file():
        return None
    record = read_json(path)
    if "metric" not in record or "accuracy" not in record:
        return None
    return {**record, "path": str(path)}


def provider_record(model_dir: Path) -> dict | None:
    """The task-gate record of the stage that wrote `model_dir` (<stage>/model -> <stage>/verify.json), if any."""
    return gate_record(Path(model_dir).parent / "verify.json")
