"""The verification gate: scorers, the gate run (`run_gate`), its verify.json record, plots and console tables."""

from dg_pipeline.verify.gate import gate_reference, run_gate
from dg_pipeline.verify.record import GateThresholds, gate_checks, load_reference
from dg_pipeline.verify.report import (
    gate_table,
    load_stage_records,
    print_gate,
    print_stage_table,
    stages_markdown,
    stages_table,
)
from dg_pipeline.verify.scorers import CompletionScorer, Score, SudokuScorer, aggregate, scorer_for

__all__ = [
    "run_gate",
    "gate_reference",
    "GateThresholds",
    "gate_checks",
    "load_reference",
    "gate_table",
    "print_gate",
    "load_stage_records",
    "print_stage_table",
    "stages_table",
    "stages_markdown",
    "Score",
    "SudokuScorer",
    "CompletionScorer",
    "scorer_for",
    "aggregate",
]
