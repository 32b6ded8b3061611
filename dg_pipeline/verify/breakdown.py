"""The gate's accuracy split by eval source and by stratum (Sudoku: clue count): which boards a model gets wrong.

Each eval Example may carry meta["eval_source"] (`pipeline`: the training generator's eval split, `file`: a user's
eval file, `independent`: the independent generator's held-out boards); an untagged example counts as `eval`. A
scorer may name strata of an example (`SudokuScorer.strata` -> {"clues": n}).

    by_source = {source: {"n", "accuracy", "ar_accuracy"}}
    by_stratum = {stratum: {source: {value: {"n", "accuracy", "ar_accuracy"}}}}   e.g. by_stratum["clues"]["independent"]["4"]
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

UNTAGGED_SOURCE = "eval"


def source_of(example) -> str:
    meta = getattr(example, "meta", None) or {}
    return str(meta.get("eval_source", UNTAGGED_SOURCE))


def first_per_source(examples: Sequence, n: int) -> list:
    """The first `n` examples of each source, in their original order."""
    taken: dict[str, int] = {}
    out = []
    for e in examples:
        s = source_of(e)
        if taken.get(s, 0) < n:
            taken[s] = taken.get(s, 0) + 1
            out.append(e)
    return out


def _cell(indices: list[int], correct: Sequence[bool], ar_correct: Sequence[bool] | None) -> dict[str, Any]:
    n = len(indices)
    return {
        "n": n,
        "accuracy": sum(bool(correct[i]) for i in indices) / n,
        "ar_accuracy": sum(bool(ar_correct[i]) for i in indices) / n if ar_correct is not None else None,
    }


def stratum_sort_key(value: str):
    """Numeric stratum values in numeric order, then the others by name."""
    return (0, int(value), "") if value.lstrip("-").isdigit() else (1, 0, value)


def accuracy_breakdown(
    examples: Sequence,
    correct: Sequence[bool],
    ar_correct: Sequence[bool] | None = None,
    strata: Callable[[Any], Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """{"by_source": ..., "by_stratum": ...} (module doc) from per-example verdicts."""
    by_source: dict[str, list[int]] = {}
    by_stratum: dict[str, dict[str, dict[str, list[int]]]] = {}
    for i, e in enumerate(examples):
        source = source_of(e)
        by_source.setdefault(source, []).append(i)
        for name, value in (strata(e) if strata else {}).items():
            by_stratum.setdefault(name, {}).setdefault(source, {}).setdefault(str(value), []).append(i)
    return {
        "by_source": {s: _cell(idx, correct, ar_correct) for s, idx in by_source.items()},
        "by_stratum": {
            name: {
                source: {v: _cell(values[v], correct, ar_correct) for v in sorted(values, key=stratum_sort_key)}
                for source, values in per_source.items()
            }
            for name, per_source in by_stratum.items()
        },
    }


def source_accuracies(examples: Sequence, correct: Sequence[bool]) -> dict[str, float]:
    """{source: accuracy}, e.g. for one point of the step sweep."""
    return {s: c["accuracy"] for s, c in accuracy_breakdown(examples, correct)["by_source"].items()}
