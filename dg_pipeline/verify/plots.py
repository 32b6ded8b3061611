"""PNG plots of a gate, drawn from plain data (no model here): the denoising-steps sweep and one trajectory.

Figures are built with `matplotlib.figure.Figure` (no pyplot global state, no display needed) and written
atomically (temporary sibling + rename).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

# Cell kinds of a trajectory grid, with their colour and legend label.
RENOISED, ACCEPTED, OUTPUT, REFERENCE = 0, 1, 2, 3
KIND_STYLE = (
    ("#eeeeee", "re-noised at this step"),
    ("#7fd18b", "accepted at this step"),
    ("#ffe08a", "block output (committed)"),
    ("#cfe2f3", "reference answer"),
)
# Canvases wider than this are cut (a 256-position canvas would be unreadable); the title says so.
MAX_TRAJECTORY_COLUMNS = 64
MAX_TRAJECTORY_ROWS = 64


def save_figure(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name (two writers never share one), with the real suffix: savefig picks the format by it.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def plot_step_sweep(points: Sequence[Mapping], metric: str, path: str | Path, title: str = "",
                    adaptive: Mapping | None = None) -> Path:
    """Accuracy (left axis, overall and per eval source) and tokens per forward (right axis) against the number of
    denoising steps per block.

    `points`: dicts with `max_denoising_steps`, `accuracy`, `tokens_per_forward` (optionally `by_source`
    {source: accuracy} and `mean_denoising_steps`). `adaptive`: the sampler's own settings (adaptive stop), drawn
    as a star at its mean steps per block.
    """
    points = sorted(points, key=lambda p: p["max_denoising_steps"])
    steps = [p["max_denoising_steps"] for p in points]
    fig = Figure(figsize=(7.5, 4.4))
    ax = fig.add_subplot()
    lines = ax.plot(steps, [p["accuracy"] for p in points], "o-", color="tab:blue", label=f"{metric}, fixed steps")
    sources = sorted({s for p in points for s in (p.get("by_source") or {})})
    if len(sources) > 1:
        for source, style in zip(sources, ("^:", "v:", "d:", "x:")):
            lines += ax.plot(steps, [(p.get("by_source") or {}).get(source, float("nan")) for p in points], style,
                             color="tab:blue", alpha=0.6, markersize=4, label=f"{metric}, fixed steps, {source}")
    if adaptive is not None and adaptive.get("mean_denoising_steps") is not None:
        lines += ax.plot([adaptive["mean_denoising_steps"]], [adaptive["accuracy"]], "*", color="tab:red",
                         markersize=14, label=f"adaptive stop (max {adaptive['max_denoising_steps']} steps)")
    ax.set_xlabel("denoising steps per block")
    ax.set_ylabel(f"accuracy ({metric})", color="tab:blue")
    ax.set_ylim(-0.02, 1.02)
    xmax = max(steps + ([adaptive["mean_denoising_steps"]] if adaptive and adaptive.get("mean_denoising_steps") else []))
    ax.set_xlim(0.5, xmax + 0.5)
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    lines += ax2.plot(steps, [p["tokens_per_forward"] for p in points], "s--", color="tab:orange",
                      label="tokens / forward, fixed steps")
    ax2.set_ylabel("committed tokens per decoder forward", color="tab:orange")
    top = max([p["tokens_per_forward"] for p in points] + [(adaptive or {}).get("tokens_per_forward") or 0])
    ax2.set_ylim(0, 1.15 * top + 1e-9)
    ax.legend(lines, [ln.get_label() for ln in lines], loc="lower right", fontsize=8)
    ax.set_title(title or "accuracy and tokens/forward vs denoising steps per block")
    return save_figure(fig, path)


def plot_trajectory(
    cells: np.ndarray,
    kinds: np.ndarray,
    tokens: Sequence[str],
    path: str | Path,
    title: str = "",
    row_labels: Sequence[str] | None = None,
) -> Path:
    """A denoising trajectory as a grid: rows = steps (top = first), columns = canvas positions, cell text = token.

    `cells` (R, C) token ids; `kinds` (R, C) one of RENOISED / ACCEPTED (a step's canvas: accepted positions are
    highlighted, the rest were re-noised), OUTPUT (what a block committed), REFERENCE (the expected answer);
    `tokens` maps an id to its text.
    """
    cells, kinds = np.asarray(cells), np.asarray(kinds, dtype=int)
    n_rows, width = cells.shape
    labels = list(row_labels) if row_labels is not None else [f"step {i + 1}" for i in range(n_rows)]
    cut = []
    if width > MAX_TRAJECTORY_COLUMNS:
        cells, kinds, width = cells[:, :MAX_TRAJECTORY_COLUMNS], kinds[:, :MAX_TRAJECTORY_COLUMNS], MAX_TRAJECTORY_COLUMNS
        cut.append(f"first {width} positions")
    if n_rows > MAX_TRAJECTORY_ROWS:
        cells, kinds, labels = cells[:MAX_TRAJECTORY_ROWS], kinds[:MAX_TRAJECTORY_ROWS], labels[:MAX_TRAJECTORY_ROWS]
        cut.append(f"first {MAX_TRAJECTORY_ROWS} of {n_rows} rows")
        n_rows = MAX_TRAJECTORY_ROWS
    fig = Figure(figsize=(max(6.0, 0.32 * width + 2.6), max(2.5, 0.3 * n_rows + 1.4)))
    ax = fig.add_subplot()
    ax.imshow(kinds, cmap=ListedColormap([c for c, _ in KIND_STYLE]), vmin=0, vmax=len(KIND_STYLE) - 1,
              aspect="auto", interpolation="nearest")
    fontsize = 8 if width <= 40 else 6
    for r in range(n_rows):
        for c in range(width):
            t = int(cells[r, c])
            ax.text(c, r, _short(tokens[t] if 0 <= t < len(tokens) else str(t)), ha="center", va="center",
                    fontsize=fontsize, family="monospace")
    ax.set_yticks(range(n_rows), labels, fontsize=8)
    ticks = list(range(0, width, 4 if width > 16 else 1))
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=8)
    ax.set_xticks(np.arange(-0.5, width, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n_rows, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("canvas position")
    ax.set_ylabel("denoising step (top = first)")
    ax.set_title((title or "denoising trajectory") + (f"  [{', '.join(cut)}]" if cut else ""), fontsize=10)
    present = sorted(set(np.unique(kinds).tolist()))
    handles = [Patch(facecolor=KIND_STYLE[k][0], edgecolor="#999999", label=KIND_STYLE[k][1]) for k in present]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
    fig.text(0.5, -0.01, "E = <eos>, P = <pad>, B = <bos>, S = <sep>, M = <mask>, U = <unk>", ha="center", fontsize=7)
    return save_figure(fig, path)


def trajectory_grid(steps: Sequence, reference_ids: Sequence[int], pad_id: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(cells, kinds, row labels) for plot_trajectory from the sampler's recorded steps (TrajectoryStep: block,
    step, temperature, canvas, argmax, accepted): each block's steps, then its output and its reference slice."""
    rows: list[np.ndarray] = []
    kinds: list[np.ndarray] = []
    labels: list[str] = []
    by_block: dict[int, list] = {}
    for t in steps:
        by_block.setdefault(int(t.block), []).append(t)
    for block, block_steps in by_block.items():
        width = len(block_steps[0].canvas)
        for i, t in enumerate(block_steps, start=1):
            rows.append(np.asarray(t.canvas))
            kinds.append(np.where(np.asarray(t.accepted, dtype=bool), ACCEPTED, RENOISED))
            labels.append(f"block {block} step {i}  T={t.temperature:.2f}")
        rows.append(np.asarray(block_steps[-1].argmax))
        kinds.append(np.full(width, OUTPUT))
        labels.append(f"block {block} output")
        ref = list(reference_ids[block * width : (block + 1) * width])
        rows.append(np.asarray(ref + [pad_id] * (width - len(ref))))
        kinds.append(np.full(width, REFERENCE))
        labels.append(f"block {block} reference")
    return np.stack(rows), np.stack(kinds), labels


def _short(token: str) -> str:
    """Special tokens as one or two letters (<eos> -> E, <pad> -> P) so cells stay narrow."""
    specials = {"<eos>": "E", "<pad>": "P", "<bos>": "B", "<sep>": "S", "<mask>": "M", "<unk>": "U"}
    if token in specials:
        return specials[token]
    token = token.replace("\u2581", "_").replace("\n", "\\n")
    return token if len(token) <= 3 else token[:3]
