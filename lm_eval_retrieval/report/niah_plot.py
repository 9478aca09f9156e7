"""Needle-in-a-haystack plots: the classic depth x context-length heatmap, and layer x head retrieval-score maps.

Inputs are what a run already leaves behind:

* lm-eval ``--log_samples`` files, ``<output_path>/<model>/samples_<task>_<timestamp>.jsonl``: one JSON object per
  line with the task's ``doc`` (``context_length``, ``length``, ``depth``, ...) and the metrics at top level
  (``rouge1_recall`` 0-100, ``needle_found`` 0/1);
* head-score files, ``<output_path>/head_score/<model>.json``.

The NIAH heatmap is the one the original tool's notebook drew (``viz/top30.png``, ``viz/random.png``): context length
on x, needle depth on y (0 % at the top), score as colour from red through yellow to green on a fixed 0-100 scale,
cell borders, and the overall average in the title. ``needle_found`` is scaled to 0-100 so both metrics share that
scale. Figures are built on their own Agg canvas (never pyplot) and written with :func:`plots.save_png`.

When a folder holds several samples files of the same task in the same model folder (the same command run again),
only the newest (by the timestamp in the file name) is plotted, so a re-run never gets averaged with an older one.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LinearSegmentedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.report.heads import head_shape, load_head_scores
from lm_eval_retrieval.report.plots import heatmap_figure, save_png

__all__ = [
    "METRICS",
    "NIAH_CMAP",
    "SAMPLES_GLOB",
    "HEATMAP_FILE",
    "SIDE_BY_SIDE_FILE",
    "find_samples",
    "load_niah_samples",
    "niah_table",
    "niah_heatmap",
    "side_by_side",
    "head_score_grid",
    "head_score_heatmap",
    "plot_results",
    "plot_side_by_side",
    "add_plot_arguments",
    "run_plot",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Metric name -> label on the plots. Both are drawn on a 0-100 scale.
METRICS: dict[str, str] = {"rouge1_recall": "ROUGE-1 recall", "needle_found": "needle found (%)"}
#: The original notebook's colours: red (0) -> yellow -> green (100).
NIAH_CMAP = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"]).with_extremes(bad="#d0d0d0")
SAMPLES_GLOB = "samples_niah*.jsonl"
HEATMAP_FILE = "niah_heatmap.png"
SIDE_BY_SIDE_FILE = "niah_side_by_side.png"
COLUMNS = ["context_length", "length", "depth", "rouge1_recall", "needle_found", "task"]

_DPI = 120
# lm-eval names samples files samples_<task>_<date>T<time>.jsonl (time with '-' instead of ':').
_SAMPLES_RE = re.compile(r"^samples_(?P<task>.+?)_(?P<stamp>\d{4}-\d{2}-\d{2}T[0-9.\-]+)\.jsonl$")


def _where(path: PathLike) -> str:
    return str(path).replace("\n", "\\n").replace("\r", "\\r")


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value).replace("\n", " ").replace("\r", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_metric(metric: Any) -> str:
    if metric not in METRICS:
        raise UserInputError(f"unknown metric {_short(metric)}; use one of: {', '.join(METRICS)}")
    return metric


# --------------------------------------------------------------------------------------------------------------------
# finding and loading samples


def _task_and_stamp(path: Path) -> tuple[str, str]:
    """``samples_niah_x_2025-01-01T10-00-00.123.jsonl -> ("niah_x", "2025-01-01T10-00-00.123")``; any other name
    gives its stem without ``samples_`` and an empty stamp."""
    match = _SAMPLES_RE.match(path.name)
    if match:
        return match.group("task"), match.group("stamp")
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.stem
    return (stem[len("samples_"):] if stem.startswith("samples_") else stem) or stem, ""


def find_samples(path: PathLike) -> list[Path]:
    """A samples file as ``[path]``, or every ``samples_niah*.jsonl`` under a folder (recursively, sorted)."""
    p = Path(path)
    if not p.exists():
        raise UserInputError(f"{_where(p)} does not exist; give a results folder or a samples_niah*.jsonl file")
    if p.is_file():
        return [p]
    found = sorted(q for q in p.rglob(SAMPLES_GLOB) if q.is_file())
    if not found:
        raise UserInputError(
            f"no {SAMPLES_GLOB} file under {_where(p)}; run lm_eval (or lm-eval-retrieval run) on a niah_ task "
            f"with --log_samples and --output_path {_where(p)}"
        )
    return found


def _newest_per_task(paths: Iterable[Path]) -> list[Path]:
    """Keep, per (folder, task), the samples file with the newest timestamp (re-runs are not averaged together)."""
    best: dict[tuple[Path, str], tuple[str, Path]] = {}
    for path in paths:
        task, stamp = _task_and_stamp(path)
        key = (path.parent, task)
        if key not in best or (stamp, str(path)) > (best[key][0], str(best[key][1])):
            best[key] = (stamp, path)
    return sorted(path for _, path in best.values())


def _number(where: str, field: str, value: Any, *, integer: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
        or (integer and float(value) != int(value))
    ):
        kind = "an integer" if integer else "a finite number"
        raise UserInputError(
            f"{where}: {field} is {_short(value)}, expected {kind}; give an lm-eval --log_samples file of a niah_ task"
        )
    return float(value)


def _parse_line(where: str, text: str, task: str) -> dict[str, Any]:
    try:
        record = json.loads(text)
    except ValueError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserInputError(
            f"{where}: not valid JSON ({detail}); give an lm-eval --log_samples file (one JSON object per line)"
        ) from None
    if not isinstance(record, dict):
        raise UserInputError(f"{where}: expected a JSON object, found {type(record).__name__}; give a samples file")
    doc = record.get("doc")
    if not isinstance(doc, dict):
        raise UserInputError(
            f"{where}: no 'doc' object; give an lm-eval --log_samples file of a niah_ task"
        )
    row: dict[str, Any] = {"task": task}
    for field in ("context_length", "depth"):
        if field not in doc:
            raise UserInputError(
                f"{where}: doc has no {field!r}; give the samples of a niah_ task (its documents carry it)"
            )
    row["context_length"] = int(_number(where, "doc.context_length", doc["context_length"], integer=True))
    row["depth"] = _number(where, "doc.depth", doc["depth"])
    length = doc.get("length")
    row["length"] = math.nan if length is None else _number(where, "doc.length", length, integer=True)
    for metric in METRICS:
        if metric not in record:
            raise UserInputError(
                f"{where}: no {metric!r} metric; give the samples of a niah_ task run with --log_samples"
            )
        row[metric] = _number(where, metric, record[metric])
    return row


def load_niah_samples(paths: PathLike | Iterable[PathLike]) -> pd.DataFrame:
    """One row per sample: ``context_length, length, depth, rouge1_recall, needle_found, task``.

    ``task`` comes from the file name (``samples_<task>_<timestamp>.jsonl``); ``length`` (actual tokens) is NaN where
    a document lacks it. Blank lines are skipped; any other bad line is a UserInputError naming file and line.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    rows: list[dict[str, Any]] = []
    files = [Path(p) for p in paths]
    if not files:
        raise UserInputError("no samples file given; give a samples_niah*.jsonl file or a results folder")
    for path in files:
        task, _ = _task_and_stamp(path)
        try:
            with open(path, encoding="utf-8") as file:
                for number, line in enumerate(file, start=1):
                    if line.strip():
                        rows.append(_parse_line(f"{_where(path)} line {number}", line, task))
        except UnicodeDecodeError:
            raise UserInputError(f"{_where(path)} is not UTF-8 text; give an lm-eval samples .jsonl file") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise UserInputError(f"cannot read {_where(path)}: {reason}; check the path") from None
    if not rows:
        raise UserInputError(
            f"no samples in {', '.join(_where(p) for p in files)}: the file(s) are empty; rerun with --log_samples"
        )
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["context_length"] = df["context_length"].astype(int)
    return df


# --------------------------------------------------------------------------------------------------------------------
# tables and figures


def niah_table(df: pd.DataFrame, metric: str = "rouge1_recall") -> pd.DataFrame:
    """Mean score per cell: depth rows (ascending) x context_length columns (ascending), on a 0-100 scale."""
    metric = _check_metric(metric)
    missing = [c for c in ("context_length", "depth", metric) if c not in getattr(df, "columns", ())]
    if missing:
        raise UserInputError(f"the samples table has no column(s) {', '.join(missing)}; build it with load_niah_samples")
    if len(df) == 0:
        raise UserInputError("the samples table is empty: there is nothing to plot; rerun with --log_samples")
    values = df[metric].astype(float) * (100.0 if metric == "needle_found" else 1.0)
    frame = pd.DataFrame({"depth": df["depth"].astype(float), "context_length": df["context_length"], "v": values})
    table = frame.pivot_table(index="depth", columns="context_length", values="v", aggfunc="mean")
    table = table.sort_index(axis=0).sort_index(axis=1)
    table.index.name, table.columns.name = "depth", "context_length"
    return table


def _new_figure(width: float, height: float, layout: str | None = None) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _thin(count: int, max_labels: int) -> list[int]:
    step = max(1, math.ceil(count / max_labels))
    return list(range(0, count, step))


def _depth_label(depth: float) -> str:
    return f"{round(float(depth), 1):g}"


def _average(table: pd.DataFrame) -> float:
    """Mean of the cells, i.e. of what the plot shows (each length x depth cell weighs the same)."""
    return float(np.nanmean(table.to_numpy(dtype=float)))


def _draw_niah(ax: Any, table: pd.DataFrame, norm: Normalize) -> Any:
    grid = table.to_numpy(dtype=float)
    rows, cols = grid.shape
    image = ax.imshow(
        np.ma.masked_invalid(grid), cmap=NIAH_CMAP, norm=norm, aspect="auto", interpolation="nearest", origin="upper"
    )
    xt, yt = _thin(cols, 24), _thin(rows, 24)
    ax.xaxis.set_major_locator(FixedLocator(xt))
    ax.xaxis.set_major_formatter(FixedFormatter([str(int(table.columns[i])) for i in xt]))
    ax.yaxis.set_major_locator(FixedLocator(yt))
    ax.yaxis.set_major_formatter(FixedFormatter([_depth_label(table.index[i]) for i in yt]))
    ax.tick_params(axis="x", labelrotation=45 if cols > 8 else 0)
    # Cell borders, as the notebook's seaborn heatmap drew them (linewidths=0.5, linecolor="grey").
    ax.xaxis.set_minor_locator(FixedLocator(np.arange(-0.5, cols, 1.0)))
    ax.yaxis.set_minor_locator(FixedLocator(np.arange(-0.5, rows, 1.0)))
    ax.grid(which="minor", color="grey", linewidth=0.5)
    ax.grid(which="major", visible=False)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("Context length (tokens)")
    ax.set_ylabel("Needle depth (%)")
    return image


def _title(name: str, metric: str, table: pd.DataFrame) -> str:
    return f"{name} | {METRICS[metric]} | average {_average(table):.1f}"


def niah_heatmap(df: pd.DataFrame, metric: str = "rouge1_recall", title: str | None = None) -> Figure:
    """The classic NIAH heatmap: context length (x) x needle depth (y, 0 % on top), score 0-100 red -> green."""
    table = niah_table(df, metric)
    rows, cols = table.shape
    fig = _new_figure(min(18.0, max(7.0, 2.5 + 0.5 * cols)), min(12.0, max(4.5, 1.5 + 0.35 * rows)))
    ax = fig.add_subplot(1, 1, 1)
    image = _draw_niah(ax, table, Normalize(vmin=0.0, vmax=100.0))
    ax.set_title(_title(title or "Needle in a haystack", metric, table), fontsize=11)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(f"{METRICS[metric]} (0-100)")
    fig.tight_layout()
    return fig


def side_by_side(
    df_a: pd.DataFrame, df_b: pd.DataFrame, name_a: str, name_b: str, metric: str = "rouge1_recall"
) -> Figure:
    """Two NIAH heatmaps next to each other on one 0-100 colour scale with a single colorbar."""
    tables = [niah_table(df_a, metric), niah_table(df_b, metric)]
    cols = max(t.shape[1] for t in tables)
    rows = max(t.shape[0] for t in tables)
    fig = _new_figure(min(24.0, max(12.0, 3.0 + 2 * (1.5 + 0.45 * cols))), min(12.0, max(4.5, 1.7 + 0.35 * rows)),
                      layout="constrained")
    norm = Normalize(vmin=0.0, vmax=100.0)
    axes = fig.subplots(1, 2)
    images = []
    for ax, table, name in zip(axes, tables, (name_a, name_b)):
        images.append(_draw_niah(ax, table, norm))
        ax.set_title(_title(name, metric, table), fontsize=11)
    bar = fig.colorbar(images[0], ax=list(axes))
    bar.set_label(f"{METRICS[metric]} (0-100)")
    return fig


def head_score_grid(scores: Mapping[tuple[int, int], Sequence[float]]) -> np.ndarray:
    """``layers x heads`` mean retrieval score; NaN for a head absent from the file or with no counted run."""
    layers, heads = head_shape(scores)
    grid = np.full((layers, heads), np.nan, dtype=float)
    for (layer, head), values in scores.items():
        if len(values):
            grid[layer, head] = float(np.mean(values))
    return grid


def head_score_heatmap(scores: Mapping[tuple[int, int], Sequence[float]], title: str | None = None) -> Figure:
    """Layer (y) x head (x) heatmap of the mean retrieval score on a 0-1 scale, best heads named in the subtitle."""
    grid = head_score_grid(scores)
    runs = max((len(v) for v in scores.values()), default=0)
    subtitle = f"{grid.shape[0]} layers x {grid.shape[1]} heads, up to {runs} counted run(s) each"
    if not np.isnan(grid).all():
        flat = np.where(np.isnan(grid), -np.inf, grid).ravel()
        order = sorted(range(flat.size), key=lambda i: (-flat[i], i))[:3]
        best = ", ".join(f"{i // grid.shape[1]}-{i % grid.shape[1]} ({flat[i]:.2f})" for i in order)
        subtitle += f"\ntop heads: {best}"
    return heatmap_figure(grid, title or "Mean retrieval score per head", "mean retrieval score",
                          vmin=0.0, vmax=1.0, subtitle=subtitle)


# --------------------------------------------------------------------------------------------------------------------
# whole results folders


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "run"


def _head_score_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.json") if p.is_file() and p.parent.name == "head_score")


def plot_results(path: PathLike, out_dir: PathLike | None = None, metric: str = "rouge1_recall") -> list[Path]:
    """Write the NIAH heatmap(s) and head-score heatmaps of a results folder (or one samples file).

    ``niah_heatmap.png`` for one task (``niah_heatmap_<task>.png`` each when there are several; the model folder is
    added to the name when several models ran the same task), and ``head_scores_<model>.png`` for every
    ``head_score/<model>.json`` found. ``out_dir`` defaults to the folder itself (a file's folder for a file).
    """
    metric = _check_metric(metric)
    p = Path(path)
    if not p.exists():
        raise UserInputError(f"{_where(p)} does not exist; give a results folder (lm_eval --output_path)")
    folder = p if p.is_dir() else p.parent
    out = Path(out_dir) if out_dir is not None else folder
    if out.exists() and not out.is_dir():
        raise UserInputError(f"output folder {_where(out)} is a file; give a folder for the plots")

    samples = [p] if p.is_file() else _newest_per_task(q for q in p.rglob(SAMPLES_GLOB) if q.is_file())
    heads = [] if p.is_file() else _head_score_files(p)
    if not samples and not heads:
        raise UserInputError(
            f"nothing to plot under {_where(p)}: no {SAMPLES_GLOB} and no head_score/*.json; run lm_eval on a niah_ "
            f"task with --log_samples --output_path {_where(p)}"
        )

    written: list[Path] = []
    if samples:
        groups: list[tuple[str, str, pd.DataFrame]] = []
        for sample in samples:
            task, _ = _task_and_stamp(sample)
            groups.append((task, sample.parent.resolve().name, load_niah_samples([sample])))
        tasks = {task for task, _, _ in groups}
        repeated = len(groups) > len(tasks)
        for task, model, part in groups:
            if len(groups) == 1:
                name, title = HEATMAP_FILE, f"{model} | {task}"
            else:
                suffix = f"{model}_{task}" if repeated else task
                name, title = f"niah_heatmap_{_safe_name(suffix)}.png", f"{model} | {task}"
            written.append(save_png(niah_heatmap(part, metric, title=title), out / name))

    stems = [h.stem for h in heads]
    for head_file in heads:
        scores = load_head_scores(head_file)
        label = head_file.stem
        if stems.count(label) > 1:
            label = "_".join(head_file.relative_to(p).with_suffix("").parts)
        fig = head_score_heatmap(scores, title=f"Mean retrieval score per head: {head_file.stem}")
        written.append(save_png(fig, out / f"head_scores_{_safe_name(label)}.png"))
    return written


def _samples_of(path: PathLike) -> tuple[pd.DataFrame, str]:
    """The samples of one run (a samples file, or a folder with exactly one niah task) and a default name for it."""
    p = Path(path)
    files = find_samples(p)
    if p.is_dir():
        files = _newest_per_task(files)
        if len(files) > 1:
            listing = ", ".join(_where(f.relative_to(p)) for f in files[:4]) + (" ..." if len(files) > 4 else "")
            raise UserInputError(
                f"{_where(p)} holds {len(files)} NIAH runs ({listing}); give one samples_niah*.jsonl file instead"
            )
        return load_niah_samples(files), p.resolve().name or str(p)
    task, _ = _task_and_stamp(p)
    return load_niah_samples(files), f"{p.parent.resolve().name} | {task}"


def plot_side_by_side(
    path_a: PathLike,
    path_b: PathLike,
    out_path: PathLike,
    name_a: str | None = None,
    name_b: str | None = None,
    metric: str = "rouge1_recall",
) -> Path:
    """Write one PNG with the NIAH heatmaps of two runs (folders or samples files) on one colour scale."""
    metric = _check_metric(metric)
    df_a, default_a = _samples_of(path_a)
    df_b, default_b = _samples_of(path_b)
    if name_a is None and name_b is None and default_a == default_b:
        default_a, default_b = _where(path_a), _where(path_b)
    fig = side_by_side(df_a, df_b, name_a or default_a, name_b or default_b, metric=metric)
    return save_png(fig, out_path)


# --------------------------------------------------------------------------------------------------------------------
# CLI


def add_plot_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``lm-eval-retrieval plot RESULTS_DIR [--side-by-side A B] [--metric M] [--out PATH]``."""
    parser.add_argument(
        "results_dir", nargs="?", metavar="RESULTS_DIR",
        help="lm_eval --output_path folder (or one samples_niah*.jsonl file): writes niah_heatmap*.png and "
             "head_scores_<model>.png into it (or into --out)",
    )
    parser.add_argument(
        "--side-by-side", nargs=2, metavar=("A", "B"), dest="side_by_side", default=None,
        help="two results folders or samples files: write one PNG with both heatmaps on one colour scale",
    )
    parser.add_argument("--names", nargs=2, metavar=("NAME_A", "NAME_B"), default=None,
                        help="titles of the two heatmaps of --side-by-side (default: the folder names)")
    parser.add_argument("--metric", choices=list(METRICS), default="rouge1_recall",
                        help="score drawn as colour, 0-100 (needle_found is scaled x100); default rouge1_recall")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help=f"output folder (default RESULTS_DIR); with --side-by-side the PNG path or a folder "
                             f"(default ./{SIDE_BY_SIDE_FILE})")
    return parser


def run_plot(args: argparse.Namespace) -> int:
    """Run the ``plot`` subcommand; prints every path written and returns 0 (bad input: UserInputError)."""
    pair = getattr(args, "side_by_side", None)
    results_dir = getattr(args, "results_dir", None)
    metric = getattr(args, "metric", "rouge1_recall")
    out = getattr(args, "out", None)
    if pair:
        if results_dir is not None:
            raise UserInputError(
                "give either RESULTS_DIR or --side-by-side A B, not both (A and B are the two runs to compare)"
            )
        target = Path(out) if out else Path(SIDE_BY_SIDE_FILE)
        if target.is_dir():
            target = target / SIDE_BY_SIDE_FILE
        names = getattr(args, "names", None) or (None, None)
        written = [plot_side_by_side(pair[0], pair[1], target, names[0], names[1], metric=metric)]
    else:
        if results_dir is None:
            raise UserInputError("give a RESULTS_DIR (lm_eval --output_path folder) or --side-by-side A B")
        if getattr(args, "names", None):
            raise UserInputError("--names goes with --side-by-side A B; drop it or add --side-by-side")
        written = plot_results(results_dir, out, metric=metric)
    for path in written:
        print(path)
    return 0
