"""Recall@k reports for ``ret-approx-hf``: per-layer tables, the statistics file and the plots that go with them.

The measurement (``ret-approx-hf``) produces one statistics dict per run, which is also the content of
``recall_stats.json`` (its shape: ``report/recall_stats.py``). It is checked once where it enters, from the probe or
from a file, and becomes a :class:`~lm_eval_retrieval.report.recall_stats.RecallStats`; the functions here take that
value (a dict is accepted too and checked on the way in).

This module turns it into the table the original tool's users know (``Layer | Mean Recall | Std Recall | Mean Error
Norm | Std Error Norm``, mean and population std across heads, plus the attention mass of the exact and approximate
top-k ids), writes the files, and loads them back with one-line errors for anything broken.

No torch here, and matplotlib is imported only when plots are drawn: the CLI must start fast and run without a model.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.report.files import atomic_write
from lm_eval_retrieval.report.recall_stats import (
    PER_HEAD_KEYS,
    STATS_FILE,
    RecallStats,
    _where,
    as_recall_stats,
)

__all__ = [
    "STATS_FILE",
    "TABLE_FILE",
    "PER_HEAD_KEYS",
    "TABLE_COLUMNS",
    "RecallStats",
    "validate_recall_stats",
    "layer_table",
    "format_recall_table",
    "nothing_counted_message",
    "run_summary",
    "total_queries",
    "write_recall_reports",
    "load_recall_stats",
    "to_json_safe",
    "dataframe_to_markdown",
]

PathLike = Union[str, "os.PathLike[str]"]

#: The table file inside a report folder (the statistics file is ``STATS_FILE``).
TABLE_FILE = "recall_table.md"

#: Column name -> (statistics key, aggregate) for :func:`layer_table`, in table order.
_COLUMN_SPEC = (
    ("Mean Recall", "recall", "mean"),
    ("Std Recall", "recall", "std"),
    ("Mean Error Norm", "error_norm", "mean"),
    ("Std Error Norm", "error_norm", "std"),
    ("Exact Top-k Mass", "exact_topk_mass", "mean"),
    ("Approx Top-k Mass", "approx_topk_mass", "mean"),
    ("Attended", "attended", "mean"),
    ("Scanned", "scanned", "mean"),
)
TABLE_COLUMNS = tuple(name for name, _, _ in _COLUMN_SPEC)


def validate_recall_stats(stats: Any, where: Any = "recall statistics") -> dict[str, Any]:
    """Check a statistics dict and return a normalised copy (plain ints/floats, NaN -> None, defaults filled in).

    The dict form of :meth:`RecallStats.from_dict` (which raises the one-line errors), for callers that want a dict;
    a :class:`RecallStats` is turned back into its dict without being checked again.
    """
    return as_recall_stats(stats, where).to_dict()


# --------------------------------------------------------------------------------------------------------------------
# tables


def total_queries(stats: Any) -> int:
    """All counted (query, head, layer) measurements."""
    return as_recall_stats(stats).total_queries


def run_summary(stats: Any) -> str:
    """One line naming the run: model, approximation, k, layerwise mode and how many queries were counted."""
    stats = as_recall_stats(stats)
    counts = stats.head_counts()
    if counts:
        low, high = min(counts), max(counts)
        per_head = f"{low} per counted head" if low == high else f"{low}-{high} per counted head"
    else:
        per_head = "none"
    return (
        f"Model {stats.model}, approximation {stats.approx}, k={stats.topk}, "
        f"layerwise_topk_analysis={stats.layerwise_topk_analysis}: "
        f"{stats.total_queries} queries counted over all layers and heads ({per_head}; "
        f"queries with fewer than {stats.min_visible_keys} visible keys are not counted)."
    )


def nothing_counted_message(stats: Any) -> str:
    """The one-line explanation for a run where no query had enough visible keys to be measured."""
    stats = as_recall_stats(stats)
    k, need = stats.topk, stats.min_visible_keys
    rule = f"10*k with k={k}" if isinstance(k, int) and need == 10 * k else f"min_visible_keys with k={k}"
    return (
        f"No query had at least {need} visible keys ({rule}), so nothing was measured: "
        f"lower topk or use longer documents."
    )


def _aggregate(values: list[float], how: str) -> float:
    if not values:
        return math.nan
    array = np.asarray(values, dtype=float)
    return float(array.mean()) if how == "mean" else float(array.std(ddof=0))


def layer_table(stats: Any) -> pd.DataFrame:
    """One row per layer (index ``Layer`` = the module name), mean and population std across the counted heads.

    Columns: ``Mean Recall | Std Recall | Mean Error Norm | Std Error Norm | Exact Top-k Mass | Approx Top-k Mass``
    as the seed printed them, then the cost: ``Attended | Scanned`` (fractions of each query's visible keys; NaN
    where the run did not measure it). Heads whose value is None (no query counted) are skipped; a layer where no head counted gets NaN.
    """
    stats = as_recall_stats(stats)
    rows = []
    for layer in stats.layers:
        row = {}
        for column, key, how in _COLUMN_SPEC:
            row[column] = _aggregate([v for v in layer.values(key) if v is not None], how)
        rows.append(row)
    index = pd.Index([layer.module for layer in stats.layers], name="Layer")
    return pd.DataFrame(rows, index=index, columns=list(TABLE_COLUMNS), dtype=float)


def _md_cell(text: Any) -> str:
    """Keep a free-text value from breaking a Markdown table row."""
    return str(text).replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _fmt(value: Any, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    number = float(value)
    if round(number, 3) == 0:
        number = 0.0  # no "-0.000"
    return f"{number:+.3f}" if signed else f"{number:.3f}"


def dataframe_to_markdown(table: pd.DataFrame, signed_columns: Sequence[str] = ()) -> str:
    """Markdown (pipe) table with 3 decimals, ``n/a`` for NaN, the index left-aligned and numbers right-aligned."""
    shown = pd.DataFrame(
        {col: [_fmt(v, signed=col in signed_columns) for v in table[col]] for col in table.columns},
        index=pd.Index([_md_cell(name) for name in table.index], name=table.index.name or "Layer"),
    )
    align = ("left",) + ("right",) * len(shown.columns)
    return shown.to_markdown(colalign=align, disable_numparse=True)


def format_recall_table(stats: Any) -> str:
    """The per-layer Markdown table, preceded by a line naming the run (see :func:`run_summary`).

    When no query was counted anywhere, the summary line is followed by :func:`nothing_counted_message` instead of a
    table of n/a. Layers where no head counted show ``n/a`` and are explained under the table.
    """
    stats = as_recall_stats(stats)
    lines = [run_summary(stats), ""]
    if stats.total_queries == 0:
        lines.append(nothing_counted_message(stats))
        return "\n".join(lines)
    table = layer_table(stats)
    lines.append(dataframe_to_markdown(table))
    empty = [name for name, row in table.iterrows() if row.isna().all()]
    if empty:
        lines.append("")
        lines.append(
            f"n/a: {len(empty)} layer(s) counted no query (fewer than {stats.min_visible_keys} visible keys)."
        )
    lines.extend(head_group_lines(stats))
    return "\n".join(lines)


def head_group_lines(stats: Any) -> list[str]:
    """Lines under the table for runs given `head_scores=`: the retrieval heads against the rest, the exact heads."""
    extra = as_recall_stats(stats).extra
    lines = []
    groups = extra.get("retrieval_heads")
    if isinstance(groups, Mapping):

        def described(values: Any) -> str:
            values = values if isinstance(values, Mapping) else {}
            return ", ".join(
                f"{label} {_fmt(values.get(key))}"
                for label, key in (("mean recall", "recall"), ("error norm", "error_norm"),
                                   ("approx top-k mass", "approx_topk_mass"))
            )  # fmt: skip

        lines += [
            "",
            f"Top-{groups.get('top')} retrieval heads of {groups.get('head_scores')} (marked on the heatmaps): "
            f"{described(groups.get('retrieval'))}; all other heads: {described(groups.get('others'))}.",
        ]
    exact = extra.get("exact_heads")
    if isinstance(exact, Mapping) and exact.get("heads"):
        heads = exact["heads"]
        kind = "the top retrieval heads" if exact.get("kind") == "exact_heads" else "random heads (the control)"
        lines += ["", f"Kept on exact attention: {len(heads)} {kind}: {', '.join(heads)}."]
    return lines


# --------------------------------------------------------------------------------------------------------------------
# files


def to_json_safe(value: Any) -> Any:
    """A deep copy that ``json.dumps(..., allow_nan=False)`` accepts: numpy scalars/arrays to Python, NaN/inf to None."""
    if isinstance(value, RecallStats):
        return to_json_safe(value.to_dict())
    if isinstance(value, Mapping):
        return {str(key): to_json_safe(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return to_json_safe(value.tolist())
    if isinstance(value, (list, tuple)):
        return [to_json_safe(item) for item in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _check_out_dir(out_dir: PathLike) -> Path:
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"output path {_where(folder)} is a file, not a folder; give a folder for the reports")
    return folder


def write_recall_reports(stats: Any, out_dir: PathLike) -> list[Path]:
    """Write ``recall_table.md``, ``recall_stats.json`` and the four PNGs into ``out_dir`` (created); return the paths.

    PNGs: ``exact_topk_attn_ratio.png``, ``approx_topk_attn_ratio.png`` (as the original named them),
    ``recall_heatmap.png`` and ``topk_mass_curve.png``. Every file is written atomically.
    """
    stats = as_recall_stats(stats)  # before anything is written; a RecallStats is already checked
    folder = _check_out_dir(out_dir)
    table_path = folder / TABLE_FILE
    stats_path = folder / STATS_FILE
    atomic_write(table_path, format_recall_table(stats) + "\n", what="recall table")
    text = json.dumps(to_json_safe(stats), indent=1, allow_nan=False, ensure_ascii=False)
    atomic_write(stats_path, text + "\n", what="recall statistics")

    from lm_eval_retrieval.report.plots import write_recall_plots  # matplotlib only when plots are drawn

    return [table_path, stats_path, *write_recall_plots(stats, folder)]


def _find_stats_file(run: Path, where: str) -> Path:
    if run.is_file():
        return run
    if not run.exists():
        raise UserInputError(
            f"{where} does not exist; give a run folder containing {STATS_FILE} or the file itself"
        )
    if not run.is_dir():
        raise UserInputError(f"{where} is not a file or folder; give a {STATS_FILE} file or its run folder")
    direct = run / STATS_FILE
    if direct.is_file():
        return direct
    try:
        below = sorted(p for p in run.glob(f"*/{STATS_FILE}") if p.is_file())
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserInputError(f"cannot list {where}: {reason}; check the path and its permissions") from None
    if len(below) == 1:
        return below[0]
    if not below:
        raise UserInputError(
            f"no {STATS_FILE} in {where} or its subfolders; give the output path of a ret-approx-hf run"
        )
    names = ", ".join(_where(p.parent.name) for p in below[:3]) + (", ..." if len(below) > 3 else "")
    raise UserInputError(
        f"{where} holds {len(below)} runs ({names}); give one of them, e.g. {_where(below[0])}"
    )


def load_recall_stats(run: PathLike) -> RecallStats:
    """Load and validate ``recall_stats.json`` from a run folder, its subfolders one level down, or the file itself.

    lm-eval writes results into ``<output_path>/<model>/``, so a folder without the file is searched one level
    down; several candidates there are an error (say which run). Every problem is a one-line UserInputError naming
    the path. Returns the checked statistics (``RecallStats.to_dict()`` gives the dict).
    """
    where = _where(run)
    path = _find_stats_file(Path(run), where)
    where = _where(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserInputError(f"{where} is not UTF-8 text; give a {STATS_FILE} written by ret-approx-hf") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserInputError(f"cannot read {where}: {reason}; check the path and its permissions") from None
    if not text.strip():
        raise UserInputError(f"{where} is empty; rerun the measurement or give another file")
    try:
        raw = json.loads(text)
    except ValueError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserInputError(f"{where} is not valid JSON ({detail}); give a {STATS_FILE} written by ret-approx-hf") from None
    return RecallStats.from_dict(raw, where)
