"""Gate records for people: a rich table of one gate, and a table (rich or markdown) across stages.

`stage_rows` is the single place that picks and formats the columns of the cross-stage table, so the console,
the model card (markdown) and stage=all all show the same numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from rich.console import Console, Group
from rich.table import Table

from dg_pipeline.core.io import read_json
from dg_pipeline.core.registry import STAGE_ORDER
from dg_pipeline.verify.breakdown import stratum_sort_key

WIDE_CONSOLE = 160
# (header, record key or key path, format) of the cross-stage table.
STAGE_COLUMNS = (
    ("metric", "metric", "{}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("indep.", ("by_source", "independent", "accuracy"), "{:.3f}"),
    ("n", "n_eval", "{}"),
    ("tok/s @1", "tokens_per_second", "{:,.1f}"),
    ("tok/s @B", "tokens_per_second_batch", "{:,.1f}"),
    ("tok/fwd", "tokens_per_forward", "{:.2f}"),
    ("steps/blk", "mean_denoising_steps", "{:.1f}"),
    ("AR acc", "ar_accuracy", "{:.3f}"),
    ("AR indep.", ("by_source", "independent", "ar_accuracy"), "{:.3f}"),
    ("AR tok/s", "ar_tokens_per_second", "{:,.1f}"),
    ("speedup", "speedup_vs_ar", "{:.2f}x"),
    ("speedup lb", "speedup_vs_ar_lower_bound", "{:.2f}x"),
    ("TTFT s", "ttft_s", "{:.3f}"),
    ("device", "device", "{}"),
)


def fmt(value: Any, pattern: str = "{}") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    try:
        return pattern.format(value)
    except (ValueError, TypeError):
        return str(value)


def lookup(record: Mapping[str, Any], key: str | tuple[str, ...]) -> Any:
    """record[key], or the value at a key path (("by_source", "independent", "accuracy")); None when absent."""
    value: Any = record
    for part in (key,) if isinstance(key, str) else key:
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _mark(passed: bool, rich: bool) -> str:
    if rich:
        return "[green]PASS[/green]" if passed else "[bold red]FAIL[/bold red]"
    return "PASS" if passed else "FAIL"


# ----------------------------------------------------------------------------------------------- one gate


def gate_table(record: Mapping[str, Any]) -> Group:
    """One gate: the measured numbers (diffusion next to the AR baseline), then each check and its verdict."""
    sim = " (simulated quantization)" if record.get("simulated") else ""
    measures = Table(
        title=f"verify: stage={record['stage']}{sim}, {record['n_eval']} examples on {record['device']}",
        title_justify="left",
    )
    measures.add_column("measure")
    measures.add_column("diffusion", justify="right")
    measures.add_column("AR baseline", justify="right")
    acc = "{:.3f}"
    measures.add_row(f"{record['metric']} (accuracy)", fmt(record["accuracy"], acc), fmt(record.get("ar_accuracy"), acc))
    for key, label in (("cell_accuracy", "cell accuracy (blanks)"), ("token_accuracy", "token accuracy")):
        if key in record:
            measures.add_row(label, fmt(record[key], acc), fmt(record.get(f"ar_{key}"), acc))
    tps = "{:,.1f}"
    measures.add_row("tokens/s @ batch 1", fmt(record["tokens_per_second"], tps), fmt(record.get("ar_tokens_per_second"), tps))
    measures.add_row(
        f"tokens/s @ batch {record.get('batch_size')}",
        fmt(record.get("tokens_per_second_batch"), tps),
        fmt(record.get("ar_tokens_per_second_batch"), tps),
    )
    measures.add_row(
        "tokens / forward", fmt(record["tokens_per_forward"], "{:.2f}"), fmt(record.get("ar_tokens_per_forward"), "{:.2f}")
    )
    measures.add_row("denoising steps / block", fmt(record["mean_denoising_steps"], "{:.1f}"), "-")
    measures.add_row("canvas positions / token", fmt(record.get("positions_per_token"), "{:.2f}"), "1.00")
    ms = "{:.1f} ms"
    measures.add_row("time to first token @ batch 1", fmt(_ms(record.get("ttft_s")), ms),
                     fmt(_ms(record.get("ar_ttft_s")), ms))
    measures.add_row("speedup vs AR @ batch 1", speedup_cell(record), "")
    fixed = record.get("fixed_step_benchmark")
    if fixed:
        measures.add_row(
            f"fixed {fixed['max_denoising_steps']} steps @ batch 1: tokens/s, tok/step, {record['metric']}",
            f"{fmt(fixed.get('tokens_per_second_median'), tps)}, {fmt(fixed.get('tokens_per_step'), '{:.2f}')}, "
            f"{fmt(fixed.get('accuracy'), acc)}", "")

    tables = [measures, *breakdown_tables(record)]
    checks = Table(title=f"gate: {_mark(record['passed'], True)}", title_justify="left")
    for column, justify in (("check", "left"), ("value", "right"), ("needs", "right"), ("", "left")):
        checks.add_column(column, justify=justify)
    for check in record["checks"]:
        checks.add_row(
            check["name"],
            fmt(check["value"], "{:.4g}"),
            f"{check.get('op', '>=')} {fmt(check['threshold'], '{:.4g}')}",
            _mark(check["passed"], True),
        )
    return Group(*tables, checks)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def speedup_cell(record: Mapping[str, Any]) -> str:
    """median [min-max over rounds], >= lower bound at the confidence."""
    median = record.get("speedup_vs_ar")
    spread = record.get("speedup_vs_ar_spread") or {}
    cell = fmt(median, "{:.2f}x")
    if spread:
        cell += f" [{spread['min']:.2f}-{spread['max']:.2f}]"
    bound, speed = record.get("speedup_vs_ar_lower_bound"), record.get("speed") or {}
    if bound is not None:
        cell += f", >= {bound:.2f}x at {speed.get('confidence', 0):.0%} ({speed.get('rounds')} rounds)"
    return cell


def breakdown_tables(record: Mapping[str, Any]) -> list[Table]:
    """Accuracy per eval source, and per stratum value (Sudoku: clue count) with one column pair per source."""
    by_source = record.get("by_source") or {}
    if not by_source:
        return []
    acc = "{:.3f}"
    table = Table(title="accuracy by eval source", title_justify="left")
    for column in ("source", "n", "diffusion", "AR baseline"):
        table.add_column(column, justify="left" if column == "source" else "right")
    for source, cell in by_source.items():
        table.add_row(source, str(cell["n"]), fmt(cell["accuracy"], acc), fmt(cell.get("ar_accuracy"), acc))
    tables = [table]
    for stratum, per_source in (record.get("by_stratum") or {}).items():
        values = sorted({v for cells in per_source.values() for v in cells}, key=stratum_sort_key)
        t = Table(title=f"accuracy by {stratum} (diffusion / AR, n)", title_justify="left")
        t.add_column(stratum, justify="right")
        for source in per_source:
            t.add_column(source, justify="right")
        for v in values:
            cells = [per_source[s].get(v) for s in per_source]
            t.add_row(v, *("-" if c is None else f"{fmt(c['accuracy'], acc)} / {fmt(c.get('ar_accuracy'), acc)}, {c['n']}"
                           for c in cells))
        tables.append(t)
    return tables


def print_gate(record: Mapping[str, Any], console: Console | None = None) -> None:
    (console or Console()).print(gate_table(record))


# ----------------------------------------------------------------------------------------------- many stages


def stage_label(record: Mapping[str, Any], path: Path | None) -> str:
    """`stage`, or `stage/<variant dir>` for records under a variant dir (quantize/fp8, export/nvfp4)."""
    stage = str(record.get("stage", "?"))
    if path is not None and path.parent.name != stage:
        return f"{stage}/{path.parent.name}"
    return stage


def load_stage_records(records: Iterable[str | Path | Mapping] | Mapping[str, Mapping]) -> list[tuple[str, dict]]:
    """(label, record) pairs in pipeline order, from verify.json paths, records, or a {label: record} map."""
    if isinstance(records, Mapping):
        pairs = [(str(k), dict(v)) for k, v in records.items()]
    else:
        pairs = []
        for item in records:
            if isinstance(item, Mapping):
                pairs.append((stage_label(item, None), dict(item)))
            else:
                path = Path(item)
                record = read_json(path)
                pairs.append((stage_label(record, path), record))
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    return sorted(pairs, key=lambda p: (order.get(p[1].get("stage"), len(order)), p[0]))


def stage_rows(pairs: Sequence[tuple[str, Mapping]], rich: bool = False) -> tuple[list[str], list[list[str]]]:
    headers = ["stage", *(h for h, _, _ in STAGE_COLUMNS), "gate"]
    rows = []
    for label, rec in pairs:
        label = f"{label} (sim)" if rec.get("simulated") else label
        rows.append([label, *(fmt(lookup(rec, k), f) for _, k, f in STAGE_COLUMNS), _mark(bool(rec.get("passed")), rich)])
    return headers, rows


def stages_table(records, title: str = "verification gates") -> Table:
    """A rich table with one row per stage's verify.json (paths, records, or a {label: record} map)."""
    headers, rows = stage_rows(load_stage_records(records), rich=True)
    table = Table(title=title, title_justify="left")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i in (0, 1, len(headers) - 2) else "right")
    for row in rows:
        table.add_row(*row)
    return table


def print_stage_table(records, console: Console | None = None, title: str = "verification gates") -> None:
    # Rich assumes 80 columns when output is not a terminal (logs, CI); this table needs more to stay readable.
    console = console or Console(width=None if Console().is_terminal else WIDE_CONSOLE)
    console.print(stages_table(records, title))


def stages_markdown(records) -> str:
    """The cross-stage table as GitHub markdown (model cards, READMEs)."""
    headers, rows = stage_rows(load_stage_records(records), rich=False)
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731 - a cell may not contain the column separator
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
