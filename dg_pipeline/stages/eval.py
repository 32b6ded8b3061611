"""Stage `eval`: run the verification gate on a model dir -> <run_dir>/eval/verify.json (+ predictions, plots).

    python -m dg_pipeline stage=eval [input=<model dir>] [data.eval_path=<file>] run_dir=<dir>

- model: `input=`, else <run_dir>/sft/model;
- examples: data.eval_path (Kaggle CSV / board JSONL for data.kind=sudoku, prompt/completion or messages JSONL
  for data.kind=chat; the first verify.n_eval / data.n_eval rows), else the run's eval split (load_splits:
  generated boards under <run_dir>/data/, reused when they exist); for Sudoku, then the independent held-out
  boards (data.independent);
- reference: the verify.json next to the model dir (e.g. <run_dir>/sft/verify.json) when there is one, so
  verify.max_accuracy_drop can hold an evaluation to its training-time gate; verify.reference overrides it.
A failed check raises GateFailed after verify.json is written (the entry point exits 1).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console

from dg_pipeline.core import RunDir, read_json
from dg_pipeline.data import chat_examples, load_splits, read_boards, read_chat_jsonl, sudoku_examples
from dg_pipeline.data.sources import FILE_SOURCE, independent_examples
from dg_pipeline.data.sudoku import size_for_length
from dg_pipeline.model.io import load_model
from dg_pipeline.stages.base import resolve_device
from dg_pipeline.verify import run_gate

STAGE = "eval"
console = Console()


def run(cfg: DictConfig) -> dict:
    rd = RunDir.from_cfg(cfg)
    input_dir = rd.resolve_input(STAGE, cfg.get("input"))
    device = resolve_device(str(cfg.get("device", "auto")))
    with console.status(f"eval: loading {input_dir}"):
        model, tokenizer = load_model(input_dir, dtype=str(cfg.model.dtype), device=device)
    examples = eval_examples(cfg, tokenizer, rd)
    console.print(f"[bold]eval[/]: {len(examples)} examples, model {input_dir} on {device}")
    return run_gate(model, tokenizer, examples, cfg, STAGE, input_dir, rd.stage(STAGE), reference=provider_record(input_dir))


def eval_examples(cfg: DictConfig, tokenizer, rd: RunDir) -> list:
    """data.eval_path read directly (no training data is touched), else the run's eval split; Sudoku adds the
    independent held-out boards."""
    data = cfg.data
    path = data.get("eval_path")
    limit = cfg.verify.get("n_eval") or data.get("n_eval")
    if not path:
        return load_splits(data, tokenizer, rd, int(cfg.seed)).gate_examples()
    if str(data.kind) == "sudoku":
        boards = read_boards(path, data.get("size"), limit=limit)
        size = data.get("size") or (size_for_length(len(boards[0].puzzle)) if boards else None)
        return sudoku_examples(boards, tokenizer, FILE_SOURCE) + independent_examples(data, tokenizer, size, len(boards))
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
