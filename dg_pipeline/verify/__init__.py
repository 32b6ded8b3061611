"""The verification gate: scorers, the gate run (`run_gate`), its verify.json record, plots and console tables."""

from dg_pipeline.verify.gate import gate_reference, run_gate
from dg_pipeline.verify.record import (
    GateSettings,
    GateThresholds,
    gate_checks,
    gate_record_beside,
    load_reference,
    read_gate_record,
)
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
    "GateSettings",
    "GateThresholds",
    "gate_record_beside",
    "read_gate_record",
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
