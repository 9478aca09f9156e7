"""Recall@k reports for ``ret-approx-hf``: per-layer tables, the statistics file and the plots that go with them.

The measurement (``ret-approx-hf``) produces one statistics dict per run, which is also the content of
``recall_stats.json``::

    {"model": "smollm2-135m", "approx": "exact_topk", "topk": 10, "layerwise_topk_analysis": True,
     "min_visible_keys": 100,
     "layers": [{"layer": 0, "module": "model.layers.0.self_attn",
                 "queries": [120, ...],            # per head; 0 => that head's values are None
                 "recall": [1.0, ...], "error_norm": [...], "exact_topk_mass": [...], "approx_topk_mass": [...]},
                ...],
     "mass_curve": {"k": [1, 2, 4, ..., 1024], "mass": [[...] per layer]}}

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

__all__ = [
    "STATS_FILE",
    "TABLE_FILE",
    "PER_HEAD_KEYS",
    "TABLE_COLUMNS",
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

#: File names inside a report folder.
STATS_FILE = "recall_stats.json"
TABLE_FILE = "recall_table.md"

#: Per-head lists every layer entry carries (``queries`` first: it says which heads counted).
PER_HEAD_KEYS = ("queries", "recall", "error_norm", "exact_topk_mass", "approx_topk_mass")
_VALUE_KEYS = PER_HEAD_KEYS[1:]

_REQUIRED_KEYS = ("model", "approx", "topk", "layerwise_topk_analysis", "layers", "mass_curve")

#: Column name -> (statistics key, aggregate) for :func:`layer_table`, in table order.
_COLUMN_SPEC = (
    ("Mean Recall", "recall", "mean"),
    ("Std Recall", "recall", "std"),
    ("Mean Error Norm", "error_norm", "mean"),
    ("Std Error Norm", "error_norm", "std"),
    ("Exact Top-k Mass", "exact_topk_mass", "mean"),
    ("Approx Top-k Mass", "approx_topk_mass", "mean"),
)
TABLE_COLUMNS = tuple(name for name, _, _ in _COLUMN_SPEC)


# --------------------------------------------------------------------------------------------------------------------
# validation


def _where(path: Any) -> str:
    """A path or label as it goes into an error message: one line, whatever the name holds."""
    return str(path).replace("\n", "\\n").replace("\r", "\\r")


def _short(value: Any, limit: int = 40) -> str:
    """A repr short enough to keep an error message on one line."""
    text = repr(value).replace("\n", " ").replace("\r", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _count(where: str, what: str, value: Any, positive: bool = False) -> int:
    """A non-negative (or positive) integer, also accepted as an integral float (``120.0``) or numpy integer."""
    ok = _is_real(value) and math.isfinite(float(value)) and float(value).is_integer()
    if ok:
        number = int(value)
        if number > 0 or (number == 0 and not positive):
            return number
    need = "a positive integer" if positive else "a non-negative integer"
    raise UserInputError(f"{where}: {what} is {_short(value)}, expected {need}; fix or regenerate the statistics")


def _value(where: str, what: str, value: Any) -> float | None:
    """A finite number, or None for 'not measured' (NaN is read as None: it means the same thing)."""
    if value is None:
        return None
    if _is_real(value):
        number = float(value)
        if math.isnan(number):
            return None
        if math.isfinite(number):
            return number
    raise UserInputError(
        f"{where}: {what} is {_short(value)}, expected a finite number or null; fix or regenerate the statistics"
    )


def _layer_name(index: int, entry: Mapping[str, Any]) -> str:
    module = entry.get("module") if isinstance(entry, Mapping) else None
    return f"layer {index} ({module!r})" if isinstance(module, str) else f"layer {index}"


def validate_recall_stats(stats: Any, where: Any = "recall statistics") -> dict[str, Any]:
    """Check a statistics dict and return a normalised copy (plain ints/floats, NaN -> None, defaults filled in).

    Raises a one-line :class:`UserInputError` that starts with ``where`` (a path when the stats came from a file)
    for anything missing or malformed. Layers may have different head counts (some models do); every per-head list
    of one layer must have the same length, and the mass curve needs one row per layer and one value per k.
    """
    where = _where(where)
    if not isinstance(stats, Mapping):
        raise UserInputError(
            f"{where}: expected a JSON object of recall statistics, found {type(stats).__name__}; "
            f"give a {STATS_FILE} written by ret-approx-hf"
        )
    missing = [key for key in _REQUIRED_KEYS if key not in stats]
    if missing:
        raise UserInputError(
            f"{where}: missing key(s) {', '.join(missing)}; give a {STATS_FILE} written by ret-approx-hf"
        )
    topk = _count(where, "topk", stats["topk"], positive=True)
    min_visible = stats.get("min_visible_keys", 10 * topk)
    min_visible = 10 * topk if min_visible is None else _count(where, "min_visible_keys", min_visible)
    layerwise = stats["layerwise_topk_analysis"]
    if not isinstance(layerwise, (bool, np.bool_)):
        raise UserInputError(
            f"{where}: layerwise_topk_analysis is {_short(layerwise)}, expected true or false; fix the statistics"
        )

    raw_layers = stats["layers"]
    if not isinstance(raw_layers, Sequence) or isinstance(raw_layers, (str, bytes)) or len(raw_layers) == 0:
        raise UserInputError(
            f"{where}: 'layers' must be a non-empty list (one entry per attention module), found {_short(raw_layers)}; "
            f"rerun the measurement"
        )
    layers: list[dict[str, Any]] = []
    for index, entry in enumerate(raw_layers):
        name = _layer_name(index, entry)
        if not isinstance(entry, Mapping):
            raise UserInputError(f"{where}: {name} is {type(entry).__name__}, expected an object; fix the statistics")
        lacking = [key for key in ("module", *PER_HEAD_KEYS) if key not in entry]
        if lacking:
            raise UserInputError(f"{where}: {name} lacks key(s) {', '.join(lacking)}; rerun the measurement")
        if not isinstance(entry["module"], str) or not entry["module"]:
            raise UserInputError(
                f"{where}: {name} has module {_short(entry['module'])}, expected a module name; fix the statistics"
            )
        lists = {}
        for key in PER_HEAD_KEYS:
            value = entry[key]
            if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
                raise UserInputError(
                    f"{where}: {name} {key} is {_short(value)}, expected a list with one value per head; "
                    f"fix the statistics"
                )
            lists[key] = list(value)
        heads = len(lists["queries"])
        if heads == 0:
            raise UserInputError(f"{where}: {name} has no heads (empty 'queries' list); rerun the measurement")
        for key in _VALUE_KEYS:
            if len(lists[key]) != heads:
                raise UserInputError(
                    f"{where}: {name} has {len(lists[key])} {key} value(s) but {heads} query counts; "
                    f"every per-head list must have one value per head"
                )
        out: dict[str, Any] = {"layer": entry.get("layer", index), "module": entry["module"]}
        out["queries"] = [_count(where, f"{name} queries[{h}]", q) for h, q in enumerate(lists["queries"])]
        for key in _VALUE_KEYS:
            values = [_value(where, f"{name} {key}[{h}]", v) for h, v in enumerate(lists[key])]
            # A head that counted no query has no measurement, whatever number the list holds.
            out[key] = [v if q > 0 else None for v, q in zip(values, out["queries"])]
        layers.append(out)

    curve = stats["mass_curve"]
    if not isinstance(curve, Mapping) or "k" not in curve or "mass" not in curve:
        raise UserInputError(
            f"{where}: 'mass_curve' must be an object with 'k' and 'mass' lists, found {_short(curve)}; "
            f"rerun the measurement"
        )
    ks_raw, mass_raw = curve["k"], curve["mass"]
    if not isinstance(ks_raw, Sequence) or isinstance(ks_raw, (str, bytes)) or len(ks_raw) == 0:
        raise UserInputError(f"{where}: mass_curve k is {_short(ks_raw)}, expected a non-empty list of key counts")
    ks = [_count(where, f"mass_curve k[{i}]", k, positive=True) for i, k in enumerate(ks_raw)]
    if any(b <= a for a, b in zip(ks, ks[1:])):
        raise UserInputError(f"{where}: mass_curve k {_short(ks)} is not strictly increasing; fix the statistics")
    if not isinstance(mass_raw, Sequence) or isinstance(mass_raw, (str, bytes)) or len(mass_raw) != len(layers):
        count = len(mass_raw) if isinstance(mass_raw, Sequence) and not isinstance(mass_raw, (str, bytes)) else None
        raise UserInputError(
            f"{where}: mass_curve mass has {count if count is not None else 'no'} row(s) for {len(layers)} layers; "
            f"it needs one row per layer"
        )
    mass: list[list[float | None]] = []
    for index, row in enumerate(mass_raw):
        if not isinstance(row, Sequence) or isinstance(row, (str, bytes)) or len(row) != len(ks):
            raise UserInputError(
                f"{where}: mass_curve mass row {index} is {_short(row)}, expected {len(ks)} values (one per k)"
            )
        mass.append([_value(where, f"mass_curve mass[{index}][{i}]", v) for i, v in enumerate(row)])

    normalised = {key: value for key, value in stats.items() if key not in ("layers", "mass_curve")}
    normalised.update(
        {
            "model": str(stats["model"]),
            "approx": str(stats["approx"]),
            "topk": topk,
            "layerwise_topk_analysis": bool(layerwise),
            "min_visible_keys": min_visible,
            "layers": layers,
            "mass_curve": {"k": ks, "mass": mass},
        }
    )
    return normalised


# --------------------------------------------------------------------------------------------------------------------
# tables


def total_queries(stats: Mapping[str, Any]) -> int:
    """All counted (query, head, layer) measurements of a validated statistics dict."""
    return sum(sum(layer["queries"]) for layer in stats["layers"])


def _per_head_counts(stats: Mapping[str, Any]) -> list[int]:
    return [q for layer in stats["layers"] for q in layer["queries"] if q > 0]


def run_summary(stats: Any) -> str:
    """One line naming the run: model, approximation, k, layerwise mode and how many queries were counted."""
    stats = validate_recall_stats(stats)
    counts = _per_head_counts(stats)
    if counts:
        low, high = min(counts), max(counts)
        per_head = f"{low} per counted head" if low == high else f"{low}-{high} per counted head"
    else:
        per_head = "none"
    return (
        f"Model {stats['model']}, approximation {stats['approx']}, k={stats['topk']}, "
        f"layerwise_topk_analysis={stats['layerwise_topk_analysis']}: "
        f"{total_queries(stats)} queries counted over all layers and heads ({per_head}; "
        f"queries with fewer than {stats['min_visible_keys']} visible keys are not counted)."
    )


def nothing_counted_message(stats: Any) -> str:
    """The one-line explanation for a run where no query had enough visible keys to be measured."""
    stats = validate_recall_stats(stats)
    k, need = stats["topk"], stats["min_visible_keys"]
    rule = f"10*k with k={k}" if need == 10 * k else f"min_visible_keys with k={k}"
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

    Columns: ``Mean Recall | Std Recall | Mean Error Norm | Std Error Norm | Exact Top-k Mass | Approx Top-k Mass``.
    Heads whose value is None (no query counted) are skipped; a layer where no head counted gets NaN.
    """
    stats = validate_recall_stats(stats)
    rows = []
    for layer in stats["layers"]:
        row = {}
        for column, key, how in _COLUMN_SPEC:
            row[column] = _aggregate([v for v in layer[key] if v is not None], how)
        rows.append(row)
    index = pd.Index([layer["module"] for layer in stats["layers"]], name="Layer")
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
    stats = validate_recall_stats(stats)
    lines = [run_summary(stats), ""]
    if total_queries(stats) == 0:
        lines.append(nothing_counted_message(stats))
        return "\n".join(lines)
    table = layer_table(stats)
    lines.append(dataframe_to_markdown(table))
    empty = [name for name, row in table.iterrows() if row.isna().all()]
    if empty:
        lines.append("")
        lines.append(
            f"n/a: {len(empty)} layer(s) counted no query (fewer than {stats['min_visible_keys']} visible keys)."
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# files


def to_json_safe(value: Any) -> Any:
    """A deep copy that ``json.dumps(..., allow_nan=False)`` accepts: numpy scalars/arrays to Python, NaN/inf to None."""
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
    validate_recall_stats(stats)  # before anything is written
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


def load_recall_stats(run: PathLike) -> dict[str, Any]:
    """Load and validate ``recall_stats.json`` from a run folder, its subfolders one level down, or the file itself.

    lm-eval writes results into ``<output_path>/<model>/``, so a folder without the file is searched one level
    down; several candidates there are an error (say which run). Every problem is a one-line UserInputError naming
    the path. Returns the normalised statistics (see :func:`validate_recall_stats`).
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
    return validate_recall_stats(raw, where)
