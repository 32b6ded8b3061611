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

from omegaconf import DictConfig
from rich.console import Console

from dg_pipeline.core import RunDir
from dg_pipeline.data import load_eval_examples
from dg_pipeline.model.io import load_model, resolve_device
from dg_pipeline.settings import RunSettings
from dg_pipeline.verify import GateSettings, gate_record_beside, run_gate

STAGE = "eval"
console = Console()


def run(cfg: DictConfig) -> dict:
    settings = RunSettings.from_cfg(cfg)
    gate = GateSettings.for_run(settings)
    rd = RunDir.from_cfg(cfg)
    input_dir = rd.resolve_input(STAGE, settings.input)
    device = resolve_device(settings.device)
    with console.status(f"eval: loading {input_dir}"):
        model, tokenizer = load_model(input_dir, dtype=settings.model.dtype, device=device)
    examples = load_eval_examples(settings.data, tokenizer, rd, settings.seed, limit=gate.n_eval)
    console.print(f"[bold]eval[/]: {len(examples)} examples, model {input_dir} on {device}")
    return run_gate(model, tokenizer, examples, gate, STAGE, input_dir, rd.output(STAGE),
                    reference=gate_record_beside(input_dir))
