"""The pipeline's one progress bar (rich): what runs, the bar, done/total, and the time elapsed or remaining."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(console: Console | None = None, prefix: str = "", remaining: bool = False) -> Progress:
    """A rich Progress for long work; `prefix` (rich markup) leads every task's description."""
    return Progress(TextColumn(prefix + "{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn() if remaining else TimeElapsedColumn(), console=console)
