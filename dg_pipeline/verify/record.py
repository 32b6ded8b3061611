"""The gate's record (verify.json): its settings and thresholds, the checks, the reference record, atomic writing.

A check is a named comparison `value <op> threshold`; the gate passes when every check passes. The record is
written before a failure is raised, so a failed stage still leaves its numbers behind.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any, Mapping, Sequence

from dg_pipeline.core.errors import GateFailed, InputError
from dg_pipeline.core.io import atomic_write_json, read_json
from dg_pipeline.settings import RunSettings, SamplerSettings, VerifySettings

VERIFY_JSON = "verify.json"
# Keys every verify.json carries (docs/ARCHITECTURE.md, verify contract); readers may rely on them.
REQUIRED_KEYS = (
    "stage",
    "input",
    "metric",
    "accuracy",
    "n_eval",
    "tokens_per_second",
    "tokens_per_forward",
    "mean_denoising_steps",
    "ar_accuracy",
    "ar_tokens_per_second",
    "speedup_vs_ar",
    "device",
    "batch_size",
    "passed",
    "checks",
)
# Accuracies are fractions; this slack keeps a float round-off from failing an exactly-met threshold.
_EPS = 1e-9
# What a failed yes/no check means, where its name does not say it.
_WHY = {
    "metric_can_move": " [the reference gate got no example right, so no drop can show: score on examples the input "
                       "model solves, train it further, or pass verify.allow_flat_metric=true to certify on the "
                       "other checks (e.g. quant.max_logits_error)]",
}


@dataclass(frozen=True)
class Check:
    """One gate check: `value op threshold` (op is ">=", "<=", or "is" for a yes/no property)."""

    name: str
    value: float | bool | None
    threshold: float | bool
    op: str
    passed: bool

    def describe(self) -> str:
        if self.op == "is":
            return f"{self.name}: {self.value} (needs {self.threshold})" + _WHY.get(self.name, "")
        value = "n/a" if self.value is None else f"{self.value:.4g}"
        return f"{self.name}: {value} (needs {self.op} {self.threshold:.4g})"

    def as_record(self) -> dict[str, Any]:
        """The check as verify.json lists it."""
        return {"name": self.name, "value": self.value, "threshold": self.threshold, "op": self.op,
                "passed": self.passed}


def at_least(name: str, value: float | None, threshold: float) -> Check:
    ok = value is not None and not math.isnan(value) and value >= threshold - _EPS
    return Check(name, value, float(threshold), ">=", ok)


def at_most(name: str, value: float | None, threshold: float) -> Check:
    ok = value is not None and not math.isnan(value) and value <= threshold + _EPS
    return Check(name, value, float(threshold), "<=", ok)


def holds(name: str, ok: bool) -> Check:
    """A yes/no property (a round trip, a tie) that must hold."""
    return Check(name, bool(ok), True, "is", bool(ok))


def metric_can_move(reference_accuracy: float, allow_flat: bool) -> Check:
    """A drop check is only evidence when the reference got something right: at reference accuracy 0 no result can
    drop (0 before, 0 after passes whatever the model became). Fails unless the run allows a flat metric, and then
    still says so: value False, passed True."""
    movable = float(reference_accuracy) > _EPS
    return Check("metric_can_move", movable, True, "is", movable or bool(allow_flat))


@dataclass(frozen=True)
class GateThresholds:
    """The gate's thresholds (the verify group, with the stage's own drop allowance; see GateSettings)."""

    min_accuracy: float = 0.0
    max_accuracy_drop: float | None = None
    min_speedup: float = 0.0
    drop_confidence: float = 0.0
    allow_flat_metric: bool = False


@dataclass(frozen=True)
class GateSettings:
    """What a gate reads of the run's settings: the verify and sampler groups, the task, how many examples."""

    verify: VerifySettings
    sampler: SamplerSettings
    task: str  # data.kind: picks the scorer and the answer length
    n_eval: int | None = None  # examples scored: verify.n_eval, else data.n_eval (None = all given)
    drop_allowance_from: str = "verify"  # the group whose max_accuracy_drop applies (quant, export: their own)
    max_accuracy_drop: float | None = None

    @classmethod
    def for_run(cls, run: RunSettings, own_allowance: str | None = None) -> "GateSettings":
        """The gate of a run. `own_allowance`: the group ("quant", "export") whose max_accuracy_drop applies when
        verify.max_accuracy_drop is null."""
        drop, source = run.verify.max_accuracy_drop, "verify"
        if drop is None and own_allowance is not None:
            drop, source = getattr(run, own_allowance).max_accuracy_drop, own_allowance
        n_eval = run.verify.n_eval if run.verify.n_eval is not None else run.data.n_eval
        return cls(run.verify, run.sampler, run.data.kind, n_eval, source, drop)

    @property
    def thresholds(self) -> GateThresholds:
        v = self.verify
        return GateThresholds(min_accuracy=float(v.min_accuracy), max_accuracy_drop=self.max_accuracy_drop,
                              min_speedup=float(v.min_speedup), drop_confidence=float(v.drop_confidence),
                              allow_flat_metric=bool(v.allow_flat_metric))


def read_gate_record(path: str | Path) -> dict | None:
    """The task-gate record at `path` (a verify.json) with its `path`, or None when absent or not a task gate
    (stage=base checks weights, not a task: no accuracy, no reference)."""
    path = Path(path)
    if not path.is_file():
        return None
    record = read_json(path)
    if "metric" not in record or "accuracy" not in record:
        return None
    return {**record, "path": str(path)}


def gate_record_beside(model_dir: str | Path) -> dict | None:
    """The task-gate record of the stage that wrote `model_dir` (<stage>/model -> <stage>/verify.json), if any."""
    return read_gate_record(Path(model_dir).parent / VERIFY_JSON)


def load_reference(explicit: str | None, passed_in: str | Path | Mapping | None, metric: str) -> dict | None:
    """The reference record for the accuracy-drop check: verify.reference (a path) wins over the stage's own.

    Returns the record with its `path` (a dict's own `path` key, else None), or None when there is no reference.
    """
    source, key = (explicit, "verify.reference") if explicit else (passed_in, "reference")
    if source is None:
        return None
    if isinstance(source, Mapping):
        record, path = dict(source), source.get("path")  # a record may say where it was read from
    else:
        path = Path(str(source)).expanduser()
        if path.is_dir():
            path = path / VERIFY_JSON
        if not path.exists():
            raise InputError(
                f"{key}={source}: no verify.json there; run the reference stage first or set verify.reference=null"
            )
        record = read_json(path)
    where = path or key
    for needed in ("metric", "accuracy"):
        if needed not in record:
            raise InputError(f"{where}: reference record has no `{needed}`; it is not a verify.json")
    if record["metric"] != metric:
        raise InputError(
            f"{where}: reference metric is {record['metric']!r} but this gate measures {metric!r}; "
            "point verify.reference at a record of the same task"
        )
    record["path"] = None if path is None else str(path)
    return record


def gate_checks(
    accuracy: float,
    speedup_vs_ar: float | None,
    thresholds: GateThresholds,
    reference: Mapping | None = None,
    paired: "PairedDrop | None" = None,
) -> list[Check]:
    """The checks of one gate. The drop check runs only with both a reference and a max_accuracy_drop.

    With `paired` (per-example verdicts of the reference and of this gate on the same examples) and
    verify.drop_confidence > 0, the drop checked is the lower confidence bound of the paired drop, so that a board
    or two flipping by chance (e.g. under FP8 noise) does not fail a gate whose allowance is one board.
    """
    checks = [at_least("min_accuracy", accuracy, thresholds.min_accuracy)]
    if reference is not None and thresholds.max_accuracy_drop is not None:
        drop = float(reference["accuracy"]) - accuracy
        if paired is not None and thresholds.drop_confidence:
            # Same boards, same sampler seed: only a drop that is real at this confidence fails the gate.
            drop = paired.drop_lower_bound(thresholds.drop_confidence)
        checks.append(at_most("max_accuracy_drop", drop, thresholds.max_accuracy_drop))
        checks.append(metric_can_move(reference["accuracy"], thresholds.allow_flat_metric))
    if thresholds.min_speedup > 0 or speedup_vs_ar is not None:
        checks.append(at_least("min_speedup", speedup_vs_ar, thresholds.min_speedup))
    return checks


@dataclass(frozen=True)
class PairedDrop:
    """Per-example verdicts of a reference gate and this gate on the same examples (McNemar-style pairing)."""

    lost: int  # correct in the reference, wrong now
    gained: int  # wrong in the reference, correct now
    n: int

    @classmethod
    def from_verdicts(cls, reference: Sequence[bool], current: Sequence[bool]) -> "PairedDrop | None":
        if len(reference) != len(current) or not current:
            return None  # not the same examples: no pairing
        lost = sum(r and not c for r, c in zip(reference, current))
        gained = sum(c and not r for r, c in zip(reference, current))
        return cls(lost, gained, len(current))

    @property
    def drop(self) -> float:
        return (self.lost - self.gained) / self.n

    def drop_lower_bound(self, confidence: float) -> float:
        """One-sided lower confidence bound of the true drop (normal approximation of the paired difference)."""
        d = self.drop
        var = max((self.lost + self.gained) / self.n - d * d, 0.0) / self.n
        return d - NormalDist().inv_cdf(confidence) * math.sqrt(var)


def reference_verdicts(reference: Mapping | None) -> list[bool] | None:
    """The reference gate's per-example verdicts (predictions.jsonl next to its verify.json), if it has them."""
    if not reference or not reference.get("path"):
        return None
    path = Path(reference["path"]).parent / "predictions.jsonl"
    if not path.exists():
        return None
    return [bool(json.loads(line)["correct"]) for line in path.read_text().splitlines() if line.strip()]


def finalize_record(record: dict[str, Any], checks: list[Check]) -> dict[str, Any]:
    """Adds `checks` and `passed` to a record (in place) and returns it."""
    record["checks"] = [c.as_record() for c in checks]
    record["passed"] = all(c.passed for c in checks)
    return record


def write_record(out_dir: str | Path, record: Mapping[str, Any]) -> Path:
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:  # a bug in the caller, not user input
        raise ValueError(f"verify record is missing {missing}")
    return atomic_write_json(Path(out_dir) / VERIFY_JSON, dict(record))


def raise_if_failed(record: Mapping[str, Any], path: str | Path) -> None:
    """GateFailed naming every failed check and its value, once the record is on disk."""
    if record["passed"]:
        return
    failed = [c for c in map(check_from_dict, record["checks"]) if not c.passed]
    raise GateFailed(
        f"stage={record['stage']} gate failed: " + "; ".join(c.describe() for c in failed) + f" (record: {path})"
    )


def check_from_dict(d: Mapping[str, Any]) -> Check:
    """A check read back from a verify.json."""
    return Check(d["name"], d["value"], d["threshold"], d.get("op", ">="), d["passed"])
