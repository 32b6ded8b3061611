"""Stage `eval`: run the verification gate on a model dir -> <run_dir>/eval/verify.json (+ predictions, plots).

    python -m dg_pipeline stage=eval [input=<dir>] [data.eval_path=<file>] run_dir=<dir>

- model: `input=`, else <run_dir>/sft/model. Any dir the pipeline writes (dg_pipeline.export.load_for_eval): a model
  dir, a quantize output (fake-quantized, as its gate ran it) or an export of any format (FP8, NVFP4, NVFP4
  experts-only: weights dequantized; bf16), its manifest verified first where it has one;
- examples: data.eval_path (Kaggle CSV / board JSONL for data.kind=sudoku, prompt/completion or messages JSONL
  for data.kind=chat; the first verify.n_eval / data.n_eval rows), else the run's eval split (load_splits:
  generated boards under <run_dir>/data/, reused when they exist); for Sudoku, then the independent held-out
  boards (data.independent);
- reference: the dir's own verify.json (a quantize output, an export) or the one next to it (e.g.
  <run_dir>/sft/verify.json for <run_dir>/sft/model) when there is one, so
  verify.max_accuracy_drop can hold an evaluation to its training-time gate; verify.reference overrides it.
A failed check raises GateFailed after verify.json is written (the entry point exits 1).
"""

from __future__ import annotations

from omegaconf import DictConfig
from rich.console import Console

from dg_pipeline.core import RunDir
from dg_pipeline.data import load_eval_examples
from dg_pipeline.export import load_for_eval
from dg_pipeline.model.io import resolve_device, stop_token_ids
from dg_pipeline.settings import RunSettings
from dg_pipeline.verify import GateSettings, gate_record_beside, read_gate_record, run_gate

STAGE = "eval"
console = Console()


def run(cfg: DictConfig) -> dict:
    settings = RunSettings.from_cfg(cfg)
    gate = GateSettings.for_run(settings)
    rd = RunDir.from_cfg(cfg)
    input_dir = rd.resolve_input(STAGE, settings.input)
    device = resolve_device(settings.device)
    with console.status(f"eval: loading {input_dir}"):
        loaded = load_for_eval(input_dir, dtype=settings.model.dtype, device=device)
    examples = load_eval_examples(settings.data, loaded.tokenizer, rd, settings.seed, limit=gate.n_eval,
                                  eos_token_ids=stop_token_ids(loaded.model))
    console.print(f"[bold]eval[/]: {len(examples)} examples, {loaded.kind} {input_dir} on {device}")
    # A quantize output or an export carries its own gate record; a model dir's is beside it (<stage>/verify.json).
    reference = read_gate_record(input_dir / "verify.json") or gate_record_beside(input_dir)
    return run_gate(loaded.model, loaded.tokenizer, examples, gate, STAGE, input_dir, rd.output(STAGE),
                    reference=reference, simulated=loaded.simulated, extra={"loaded_as": loaded.kind})
