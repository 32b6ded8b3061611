"""Validation of settings values: each failure is one InputError that names the key, the value and the rule."""

from __future__ import annotations

from typing import Any, Iterable

from dg_pipeline.core.errors import InputError


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_choice(key: str, value: Any, choices: Iterable[str], hint: str = "") -> None:
    choices = tuple(choices)
    if value not in choices:
        raise InputError(f"{key}={value}: choose one of {', '.join(choices)}{hint}")


def check_positive_int(key: str, value: Any, what: str = "a positive integer", optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{key}={value}: must be {what}" + (" (or null)" if optional else ""))


def check_non_negative_int(key: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InputError(f"{key}={value!r}: must be a non-negative integer" + (" (or null)" if optional else ""))


def check_number(key: str, value: Any, low: float | None = None, high: float | None = None,
                 low_inclusive: bool = True, high_inclusive: bool = True, optional: bool = False) -> None:
    """low <= value <= high (either bound optional, each inclusive or not)."""
    if value is None and optional:
        return
    ok = _number(value)
    ok = ok and (low is None or (value >= low if low_inclusive else value > low))
    ok = ok and (high is None or (value <= high if high_inclusive else value < high))
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>=' if low_inclusive else '>'} {low}")
        if high is not None:
            bounds.append(f"{'<=' if high_inclusive else '<'} {high}")
        null = " (or null)" if optional else ""
        raise InputError(f"{key}={value!r}: must be a number {' and '.join(bounds)}{null}")
