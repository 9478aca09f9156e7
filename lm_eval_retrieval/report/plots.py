"""Plots for ``ret-approx-hf`` statistics: layer x head heatmaps and attention-mass-vs-k curves.

Every ``*_figure`` function returns a :class:`matplotlib.figure.Figure` drawn on its own Agg canvas (no pyplot, so
no global state leaks between calls or into a notebook), and :func:`save_png` writes one atomically. Missing values
(heads that counted no query, padding where layers have fewer heads) are drawn as grey cells or left out of a curve;
nothing here raises on them.

They take a :class:`~lm_eval_retrieval.report.recall_stats.RecallStats`, checked once where the statistics entered
(a plain dict is accepted too, and checked on the way in).

File names (as the original tool named the first two): ``exact_topk_attn_ratio.png``, ``approx_topk_attn_ratio.png``,
``recall_heatmap.png``, ``topk_mass_curve.png``.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Union

import numpy as np
from matplotlib import cm, colormaps, ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.report.files import atomic_write
from lm_eval_retrieval.report.recall_stats import RecallStats, as_recall_stats

__all__ = [
    "EXACT_MASS_FILE",
    "APPROX_MASS_FILE",
    "RECALL_HEATMAP_FILE",
    "MASS_CURVE_FILE",
    "head_grid",
    "heatmap_figure",
    "topk_mass_heatmap",
    "topk_mass_heatmap_figure",
    "recall_heatmap",
    "recall_heatmap_figure",
    "mass_curve",
    "mass_curve_figure",
    "save_png",
    "write_recall_plots",
]

PathLike = Union[str, "os.PathLike[str]"]

EXACT_MASS_FILE = "exact_topk_attn_ratio.png"
APPROX_MASS_FILE = "approx_topk_attn_ratio.png"
RECALL_HEATMAP_FILE = "recall_heatmap.png"
MASS_CURVE_FILE = "topk_mass_curve.png"

_MISSING_COLOUR = "#d0d0d0"
_DPI = 120


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _run_label(stats: RecallStats) -> str:
    mode = "layerwise" if stats.layerwise_topk_analysis else "end-to-end"
    return f"{stats.model}, {stats.approx}, {mode}"


def head_grid(stats: RecallStats, key: str) -> np.ndarray:
    """``layers x max_heads`` float array of a per-head statistic; NaN for None and for padding (fewer heads)."""
    stats = as_recall_stats(stats)
    grid = np.full((len(stats.layers), stats.max_heads), np.nan, dtype=float)
    for row, layer in enumerate(stats.layers):
        for col, value in enumerate(layer.values(key)):
            if value is not None:
                grid[row, col] = value
    return grid


def _ticks(count: int, max_labels: int = 32) -> list[int]:
    step = max(1, math.ceil(count / max_labels))
    return list(range(0, count, step))


def heatmap_figure(
    grid: np.ndarray,
    title: str,
    colorbar_label: str,
    *,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str = "viridis",
    norm: Normalize | None = None,
    subtitle: str | None = None,
    marked: list[tuple[int, int]] | None = None,
) -> Figure:
    """A layer (y, layer 0 at the top) x head (x) heatmap with a colorbar; NaN cells are drawn grey; `marked`
    (layer, head) cells get a red frame (the retrieval heads of a head-score file)."""
    grid = np.asarray(grid, dtype=float)
    if grid.ndim != 2 or grid.size == 0:
        raise UserInputError(f"a heatmap needs a non-empty layers x heads grid, got shape {grid.shape}")
    layers, heads = grid.shape
    width = min(16.0, max(6.0, 2.5 + 0.32 * heads))
    height = min(14.0, max(4.0, 1.5 + 0.26 * layers))
    fig = _new_figure(width, height)
    ax = fig.add_subplot(1, 1, 1)
    colours = colormaps[cmap].with_extremes(bad=_MISSING_COLOUR)
    masked = np.ma.masked_invalid(grid)
    kwargs: dict[str, Any] = {"norm": norm} if norm is not None else {"vmin": vmin, "vmax": vmax}
    image = ax.imshow(masked, cmap=colours, aspect="auto", interpolation="nearest", origin="upper", **kwargs)
    ax.set_xlabel("Head")
    ax.set_ylabel("Layer")
    ax.xaxis.set_major_locator(FixedLocator(_ticks(heads)))
    ax.yaxis.set_major_locator(FixedLocator(_ticks(layers)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_title(title if subtitle is None else f"{title}\n{subtitle}", fontsize=11)
    if marked:
        ax.scatter([h for _, h in marked], [layer for layer, _ in marked], marker="s", s=60, facecolors="none",
                   edgecolors="red", linewidths=1.2, label="retrieval heads")  # fmt: skip
        ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(colorbar_label)
    if np.isnan(grid).all():
        ax.text(0.5, 0.5, "no query counted", transform=ax.transAxes, ha="center", va="center", fontsize=12)
    fig.tight_layout()
    return fig


def topk_mass_heatmap(stats: RecallStats, which: str = "exact") -> Figure:
    """Layer x head heatmap of the attention mass (exact softmax) held by the exact or approximate top-k ids, 0-1."""
    if which not in ("exact", "approx"):
        raise UserInputError(f"which must be 'exact' or 'approx', got {which!r}; pick one of the two")
    stats = as_recall_stats(stats)
    k = stats.topk
    adjective = "exact" if which == "exact" else "approximate"
    return heatmap_figure(
        head_grid(stats, f"{which}_topk_mass"),
        f"Attention mass of {adjective} top-{k} ids",
        "attention mass (exact softmax)",
        subtitle=_run_label(stats),
        marked=_retrieval_heads(stats),
    )


def recall_heatmap(stats: RecallStats) -> Figure:
    """Layer x head heatmap of Recall@k (approximate ids vs exact top-k), 0-1."""
    stats = as_recall_stats(stats)
    k = stats.topk
    return heatmap_figure(
        head_grid(stats, "recall"), f"Recall@{k} of retrieved keys vs exact top-{k}", f"Recall@{k}",
        subtitle=_run_label(stats), marked=_retrieval_heads(stats),
    )


def _retrieval_heads(stats: RecallStats) -> list[tuple[int, int]]:
    """The (layer, head) pairs a run marked as retrieval heads (`head_scores=` on ret-approx-hf), else none."""
    groups = stats.extra.get("retrieval_heads")
    heads = groups.get("heads") if isinstance(groups, dict) else None
    marked = []
    for name in heads or []:
        layer, _, head = str(name).partition("-")
        if layer.isdigit() and head.isdigit():
            marked.append((int(layer), int(head)))
    return marked


def mass_curve(stats: RecallStats) -> Figure:
    """Attention mass captured by the top-k keys against k (log2 x axis), one line per layer, dotted line at k."""
    stats = as_recall_stats(stats)
    ks = stats.mass_k
    rows = stats.mass
    layers = len(rows)
    topk = stats.topk
    fig = _new_figure(8.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    colours = colormaps["viridis"]
    norm = Normalize(vmin=0, vmax=max(layers - 1, 1))
    x = np.asarray(ks, dtype=float)
    drawn = 0
    for index, row in enumerate(rows):
        y = np.array([np.nan if v is None else v for v in row], dtype=float)
        if np.isnan(y).all():
            continue
        ax.plot(x, y, color=colours(norm(index)), linewidth=1.2, marker="o" if len(x) == 1 else None, markersize=3)
        drawn += 1
    low, high = x.min(), x.max()
    if isinstance(topk, int):  # a share of the visible keys ("5%") is a different k for every query: no line
        ax.axvline(topk, color="black", linestyle=":", linewidth=1.2, label=f"k={topk}")
        low, high = min(low, topk), max(high, topk)
    ax.set_xscale("log", base=2)
    if low == high:
        low, high = low / 2, high * 2
    ax.set_xlim(low, high)
    ticks = [k for k in ks if low <= k <= high]
    ax.xaxis.set_major_locator(FixedLocator(ticks[:: max(1, math.ceil(len(ticks) / 12))]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.set_ylim(0.0, 1.02)
    ax.yaxis.set_major_locator(MaxNLocator(6))
    ax.set_xlabel("k (keys kept, largest exact scores first)")
    ax.set_ylabel("attention mass captured")
    ax.set_title(f"Attention mass of the top-k keys vs k\n{_run_label(stats)}", fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    if isinstance(topk, int):
        ax.legend(loc="lower right")
    mappable = cm.ScalarMappable(norm=norm, cmap=colours)
    mappable.set_array([])
    bar = fig.colorbar(mappable, ax=ax)
    bar.set_label("Layer")
    if drawn == 0:
        ax.text(0.5, 0.5, "no query counted", transform=ax.transAxes, ha="center", va="center", fontsize=12)
    fig.tight_layout()
    return fig


# Names with the ``_figure`` suffix, for callers that prefer them.
topk_mass_heatmap_figure = topk_mass_heatmap
recall_heatmap_figure = recall_heatmap
mass_curve_figure = mass_curve


def save_png(fig: Figure, path: PathLike) -> Path:
    """Render ``fig`` to PNG in memory with Agg and write it atomically; returns the path."""
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    target = Path(path)
    atomic_write(target, buffer.getvalue(), what="plot")
    return target


def write_recall_plots(stats: RecallStats, out_dir: PathLike) -> list[Path]:
    """Draw and write the four PNGs of a run into ``out_dir``; returns their paths in a fixed order."""
    stats = as_recall_stats(stats)
    folder = Path(out_dir)
    jobs = (
        (EXACT_MASS_FILE, lambda: topk_mass_heatmap(stats, "exact")),
        (APPROX_MASS_FILE, lambda: topk_mass_heatmap(stats, "approx")),
        (RECALL_HEATMAP_FILE, lambda: recall_heatmap(stats)),
        (MASS_CURVE_FILE, lambda: mass_curve(stats)),
    )
    return [save_png(draw(), folder / name) for name, draw in jobs]
