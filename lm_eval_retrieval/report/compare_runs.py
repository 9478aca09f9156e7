"""Compare two ``ret-approx-hf`` runs of the same model layer by layer (e.g. two approximations, two k, or
layerwise vs end-to-end): mean recall, error norm and approximate top-k mass side by side, with Δ = B − A.

No torch here; matplotlib is imported only when the delta heatmap is drawn.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import pandas as pd

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.report.files import atomic_write
from lm_eval_retrieval.report.recall import (
    _md_cell,
    _where,
    dataframe_to_markdown,
    layer_table,
    load_recall_stats,
    run_summary,
    total_queries,
    validate_recall_stats,
)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = [
    "COMPARISON_FILE",
    "DELTA_HEATMAP_FILE",
    "COMPARISON_COLUMNS",
    "run_shape",
    "compare_runs",
    "format_comparison",
    "delta_heatmap",
    "delta_heatmap_figure",
    "write_comparison",
]

PathLike = Union[str, "os.PathLike[str]"]

COMPARISON_FILE = "comparison.md"
DELTA_HEATMAP_FILE = "recall_delta_heatmap.png"

#: (per-run column in :func:`layer_table`, short name used in the comparison columns)
_COMPARED = (
    ("Mean Recall", "Recall"),
    ("Mean Error Norm", "Error Norm"),
    ("Approx Top-k Mass", "Approx Top-k Mass"),
)
COMPARISON_COLUMNS = tuple(
    name for column, short in _COMPARED for name in (f"{column} A", f"{column} B", f"Δ {short}")
)
_DELTA_COLUMNS = tuple(f"Δ {short}" for _, short in _COMPARED)


def run_shape(stats: Mapping[str, Any]) -> tuple[int, list[int]]:
    """``(layers, heads per layer)`` of validated statistics."""
    return len(stats["layers"]), [len(layer["queries"]) for layer in stats["layers"]]


def _describe(shape: tuple[int, list[int]]) -> tuple[int, str]:
    layers, heads = shape
    low, high = min(heads), max(heads)
    return layers, (str(low) if low == high else f"{low}-{high}")


def _check_same_shape(a: Mapping[str, Any], b: Mapping[str, Any]) -> None:
    shape_a, shape_b = run_shape(a), run_shape(b)
    if shape_a == shape_b:
        return
    (la, ha), (lb, hb) = _describe(shape_a), _describe(shape_b)
    if (la, ha) == (lb, hb):  # same totals, different per-layer head counts
        first = next(i for i, (x, y) in enumerate(zip(shape_a[1], shape_b[1])) if x != y)
        raise UserInputError(
            f"run A has {shape_a[1][first]} heads in layer {first}, run B {shape_b[1][first]}: "
            f"compare runs of the same model"
        )
    raise UserInputError(f"run A has {la} layers x {ha} heads, run B {lb} x {hb}: compare runs of the same model")


def compare_runs(stats_a: Any, stats_b: Any) -> pd.DataFrame:
    """Per layer side by side: ``Mean Recall A | Mean Recall B | Δ Recall | Mean Error Norm A | ... B | Δ Error Norm |
    Approx Top-k Mass A | ... B | Δ Approx Top-k Mass`` with Δ = B − A, index ``Layer`` (run A's module names).

    Runs with different layer or head counts come from different models: a one-line UserInputError naming both shapes.
    """
    a = validate_recall_stats(stats_a, "run A")
    b = validate_recall_stats(stats_b, "run B")
    _check_same_shape(a, b)
    table_a, table_b = layer_table(a), layer_table(b)
    columns: dict[str, np.ndarray] = {}
    for column, short in _COMPARED:
        col_a = table_a[column].to_numpy(dtype=float)
        col_b = table_b[column].to_numpy(dtype=float)
        columns[f"{column} A"] = col_a
        columns[f"{column} B"] = col_b
        columns[f"Δ {short}"] = col_b - col_a
    return pd.DataFrame(columns, index=table_a.index.copy(), columns=list(COMPARISON_COLUMNS), dtype=float)


def _one_line(name: Any) -> str:
    return " ".join(str(name).split())


def format_comparison(stats_a: Any, stats_b: Any, name_a: Any = "A", name_b: Any = "B") -> str:
    """Markdown: one header line per run (name, model, approximation, k, layerwise mode, queries), then the table."""
    a = validate_recall_stats(stats_a, "run A")
    b = validate_recall_stats(stats_b, "run B")
    table = compare_runs(a, b)
    lines = [
        f"- A ({_md_cell(_one_line(name_a))}): {run_summary(a)}",
        f"- B ({_md_cell(_one_line(name_b))}): {run_summary(b)}",
        "",
    ]
    if a["model"] != b["model"]:
        lines += [f"Note: the runs name different models ({a['model']} vs {b['model']}) of the same shape.", ""]
    modules_b = [layer["module"] for layer in b["layers"]]
    if list(table.index) != modules_b:
        lines += ["Note: the module names differ between the runs; rows are labelled with run A's names.", ""]
    lines.append("Δ = B − A (mean across the heads that counted queries).")
    lines.append("")
    lines.append(dataframe_to_markdown(table, signed_columns=_DELTA_COLUMNS))
    empty = [name for name, count in (("A", total_queries(a)), ("B", total_queries(b))) if count == 0]
    if empty:
        lines.append("")
        lines.append(
            f"Run {' and '.join(empty)} counted no query (too few visible keys): lower topk or use longer documents."
        )
    return "\n".join(lines)


def _recall_grid(stats: Mapping[str, Any]) -> np.ndarray:
    from lm_eval_retrieval.report.plots import head_grid

    return head_grid(stats, "recall")


def delta_heatmap(stats_a: Any, stats_b: Any, name_a: Any = "A", name_b: Any = "B") -> "Figure":
    """Layer x head heatmap of recall B − A, diverging colormap with symmetric limits centred at 0 (grey: missing)."""
    from lm_eval_retrieval.report.plots import heatmap_figure

    a = validate_recall_stats(stats_a, "run A")
    b = validate_recall_stats(stats_b, "run B")
    _check_same_shape(a, b)
    delta = _recall_grid(b) - _recall_grid(a)
    finite = delta[np.isfinite(delta)]
    limit = float(np.abs(finite).max()) if finite.size else 0.0
    limit = max(limit, 0.01)  # a run compared with itself still gets a readable (all-white) scale
    limit = math.ceil(limit * 100) / 100
    k_a, k_b = a["topk"], b["topk"]
    ks = f"k={k_a}" if k_a == k_b else f"k={k_a} vs {k_b}"
    return heatmap_figure(
        delta,
        f"Recall change B − A ({ks})",
        "Δ recall (B − A)",
        vmin=-limit,
        vmax=limit,
        cmap="RdBu",
        subtitle=f"A: {_one_line(name_a)}  |  B: {_one_line(name_b)}",
    )


delta_heatmap_figure = delta_heatmap


def _load(run: Any) -> tuple[dict[str, Any], str]:
    if isinstance(run, Mapping):
        return validate_recall_stats(run), str(run.get("model", "run"))
    return load_recall_stats(run), _where(run)


def write_comparison(run_a: Any, run_b: Any, out_dir: PathLike, name_a: Any = None, name_b: Any = None) -> list[Path]:
    """Load two runs (folders or ``recall_stats.json`` files, see ``load_recall_stats``; already loaded dicts are
    accepted too) and write ``comparison.md`` and ``recall_delta_heatmap.png`` into ``out_dir``; returns the paths.

    Run names default to the paths as given. Prints nothing: the CLI prints the Markdown.
    """
    stats_a, default_a = _load(run_a)
    stats_b, default_b = _load(run_b)
    name_a = default_a if name_a is None else name_a
    name_b = default_b if name_b is None else name_b
    text = format_comparison(stats_a, stats_b, name_a, name_b)  # raises on a shape mismatch before any write
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"output path {_where(folder)} is a file, not a folder; give a folder for the comparison")
    from lm_eval_retrieval.report.plots import save_png

    figure = delta_heatmap(stats_a, stats_b, name_a, name_b)
    md_path = folder / COMPARISON_FILE
    png_path = folder / DELTA_HEATMAP_FILE
    atomic_write(md_path, text + "\n", what="comparison")
    save_png(figure, png_path)
    return [md_path, png_path]
