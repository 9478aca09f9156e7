"""Head-score files: load, rank, compare and write them.

A head-score file is what the original Retrieval Head tool writes to ``head_score/<model>.json`` and what its users
already analyse with a three-line snippet: one line of JSON, ``{"<layer>-<head>": [score, ...], ...}``, one
per-run retrieval score per document that passed the ROUGE gate. This module keeps that format exactly (so the
original snippet keeps working on our files) and adds the checks and reports the original left to the user:
a clear one-line error for a broken file instead of a traceback, a deterministic ranking, and a comparison of two
files (top-k overlap and Spearman correlation), e.g. the same model at two context lengths or with an approximation.

No torch here: the CLI's ``heads`` and ``compare`` commands must start fast and run without a model.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.report.files import atomic_write

__all__ = [
    "HeadScores",
    "load_head_scores",
    "head_shape",
    "rank_heads",
    "format_ranking",
    "compare_head_scores",
    "format_comparison",
    "write_head_scores",
    "parse_head_key",
    "score_label",
    "method_labels",
    "compare_many",
    "format_matrix",
]

#: Parsed head scores: ``(layer, head) -> per-run scores``.
HeadScores = dict[tuple[int, int], list[float]]

PathLike = Union[str, "os.PathLike[str]"]


def _where(path: PathLike) -> str:
    """The path as it goes into an error message: one line, whatever the file name holds."""
    return str(path).replace("\n", "\\n").replace("\r", "\\r")

_KEY_RE = re.compile(r"^(\d+)-(\d+)$")


# --------------------------------------------------------------------------------------------------------------------
# validation helpers


def _short(value: Any, limit: int = 40) -> str:
    """A repr short enough to keep an error message on one line."""
    text = repr(value).replace("\n", " ").replace("\r", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_head_key(key: Any) -> tuple[int, int] | None:
    """``"12-3" -> (12, 3)``; ``None`` for anything that is not ``<int>-<int>`` (so callers word their own error)."""
    if not isinstance(key, str):
        return None
    match = _KEY_RE.match(key)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def _is_score(value: Any) -> bool:
    """A finite real number (bools excluded: ``True`` in a score list is a bug upstream, not a score of 1)."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, (bool, np.bool_))
        and math.isfinite(float(value))
    )


def _check_scores(where: str, key: str, value: Any) -> list[float]:
    """Return ``value`` as a list of floats or raise a one-line UserInputError that names ``where`` and ``key``."""
    if not isinstance(value, (list, tuple)):
        raise UserInputError(
            f"{where}: head {key!r} has {type(value).__name__} {_short(value)}, expected a list of scores; "
            f"each value must be a list of numbers like [0.5, 1.0]"
        )
    out: list[float] = []
    for item in value:
        if not _is_score(item):
            raise UserInputError(
                f"{where}: head {key!r} has non-numeric or non-finite score {_short(item)}; "
                f"each value must be a list of finite numbers"
            )
        out.append(float(item))
    return out


def _normalise(where: str, raw: Any) -> HeadScores:
    """Validate a decoded head-score object and convert it to ``{(layer, head): [float, ...]}``."""
    if not isinstance(raw, dict):
        raise UserInputError(
            f"{where}: expected a JSON object {{\"<layer>-<head>\": [scores]}}, found {type(raw).__name__}; "
            f"give a head_score/<model>.json file"
        )
    if not raw:
        raise UserInputError(
            f"{where}: the file has no heads (empty JSON object); rerun the detection or give another file"
        )
    scores: HeadScores = {}
    for key, value in raw.items():
        parsed = parse_head_key(key)
        if parsed is None:
            raise UserInputError(
                f"{where}: key {_short(key)} is not '<layer>-<head>' (two non-negative integers, e.g. '16-19')"
            )
        if parsed in scores:
            raise UserInputError(
                f"{where}: head {parsed[0]}-{parsed[1]} appears twice (key {_short(key)}); keep one entry per head"
            )
        scores[parsed] = _check_scores(where, key, value)
    return scores


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for json: plain json keeps the last duplicate silently, which would hide a broken merge."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(ValueError):
    """Raised inside json decoding for a repeated key; turned into a UserInputError by the caller."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _reject_constant(name: str) -> Any:
    """``parse_constant`` for json: NaN/Infinity are not valid scores (and not valid JSON either)."""
    raise ValueError(f"non-finite number {name}")


def _decode(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant)


# --------------------------------------------------------------------------------------------------------------------
# loading


def load_head_scores(path: PathLike) -> HeadScores:
    """Load and validate a head-score file, returning ``{(layer, head): [score, ...]}``.

    Reads the first line as JSON, as the original analysis snippet does (``json.loads(file.readline())``), so any
    file the snippet reads, this reads the same way. If the first line is not a complete JSON value (a
    pretty-printed file, re-saved by an editor or ``json.dump(..., indent=2)``), the whole file is parsed instead.
    Every problem is a one-line UserInputError naming the path, because this is the first thing users point at
    a file from somewhere else.
    """
    where = _where(path)
    p = Path(path)
    if not p.exists():
        raise UserInputError(f"head-score file {where} does not exist; give the path of a head_score/<model>.json file")
    if p.is_dir():
        raise UserInputError(f"head-score path {where} is a directory; give the path of a head_score/<model>.json file")
    try:
        with open(p, encoding="utf-8") as file:
            first = file.readline()
            rest = file.read()
    except UnicodeDecodeError:
        raise UserInputError(f"head-score file {where} is not UTF-8 text; give a JSON head-score file") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserInputError(
            f"cannot read head-score file {where}: {reason}; check the path and its permissions"
        ) from None

    if not (first + rest).strip():
        raise UserInputError(f"head-score file {where} is empty; rerun the detection or give another file")

    raw: Any = None
    decoded = False
    if first.strip():
        try:
            raw = _decode(first)
            decoded = True
        except _DuplicateKey as dup:
            raise UserInputError(
                f"{where}: key {_short(dup.key)} appears twice; keep one entry per head"
            ) from None
        except ValueError:
            decoded = False
    if not decoded:
        try:
            raw = _decode(first + rest)
        except _DuplicateKey as dup:
            raise UserInputError(
                f"{where}: key {_short(dup.key)} appears twice; keep one entry per head"
            ) from None
        except ValueError as exc:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserInputError(
                f"head-score file {where} is not valid JSON ({detail}); give a file written by the detection"
            ) from None
    return _normalise(where, raw)


# --------------------------------------------------------------------------------------------------------------------
# ranking


def head_shape(scores: Mapping[tuple[int, int], Sequence[float]]) -> tuple[int, int]:
    """``(num_layers, num_heads)`` as ``max index + 1``: the file stores no shape, and comparisons need one."""
    if not scores:
        raise UserInputError("head scores are empty: there is no head to measure; give a non-empty head-score file")
    layers = max(layer for layer, _ in scores) + 1
    heads = max(head for _, head in scores) + 1
    return layers, heads


def _mean(values: Sequence[float]) -> float:
    """Mean as the original snippet computes it (``np.mean``), but 0.0 for an empty list instead of NaN + warning.

    A head with no counted run has no evidence of retrieval, so it ranks with score 0, not as NaN (which would make
    the sort order undefined).
    """
    if len(values) == 0:
        return 0.0
    return float(np.mean(values))


def rank_heads(scores: Mapping[tuple[int, int], Sequence[float]]) -> list[tuple[int, int, float]]:
    """All heads as ``(layer, head, mean score)``, best first.

    Same order as the original snippet (``np.mean``, ``sorted(reverse=True)``) on files written layer-major, which
    is how both tools write them; ties go to the lower ``(layer, head)`` so the ranking never depends on key order.
    """
    ranked = [(layer, head, _mean(values)) for (layer, head), values in scores.items()]
    ranked.sort(key=lambda item: (-item[2], item[0], item[1]))
    return ranked


def _check_top(top: Any) -> int:
    if isinstance(top, bool) or not isinstance(top, numbers.Integral) or top < 1:
        raise UserInputError(f"top must be a positive integer, got {_short(top)}; pass e.g. top=10")
    return int(top)


def _md_cell(text: str) -> str:
    """Keep a free-text value from breaking a Markdown table row."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_ranking(scores: Mapping[tuple[int, int], Sequence[float]], top: int = 10) -> str:
    """A Markdown table of the ``top`` heads: rank, layer, head, mean score (3 decimals), number of counted runs.

    The runs column is there because a mean over 2 runs and over 200 runs are not the same evidence; an all-zero
    runs column says that no document passed the ROUGE gate, the original tool's most common silent failure.
    """
    top = _check_top(top)
    ranked = rank_heads(scores)[:top]
    lines = ["| Rank | Layer | Head | Mean score | Runs |", "|---:|---:|---:|---:|---:|"]
    for rank, (layer, head, mean) in enumerate(ranked, start=1):
        lines.append(f"| {rank} | {layer} | {head} | {mean:.3f} | {len(scores[(layer, head)])} |")
    if scores and all(len(v) == 0 for v in scores.values()):
        lines.append("")
        lines.append(
            "No run counted for any head (no document passed the ROUGE gate): check the answers at this context "
            "length, the chat template and the max new tokens."
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# comparison


def _spearman(a: Mapping[tuple[int, int], Sequence[float]], b: Mapping[tuple[int, int], Sequence[float]]) -> dict:
    """Spearman rho of mean scores over the heads both files have; NaN with a reason where it is undefined."""
    common = sorted(set(a) & set(b))
    result: dict[str, Any] = {"spearman": math.nan, "spearman_pvalue": math.nan, "spearman_heads": len(common),
                              "spearman_note": None}
    if len(common) < 2:
        result["spearman_note"] = f"undefined: the files share {len(common)} head(s), at least 2 are needed"
        return result
    xa = np.array([_mean(a[k]) for k in common], dtype=float)
    xb = np.array([_mean(b[k]) for k in common], dtype=float)
    constant = [name for name, x in (("a", xa), ("b", xb)) if np.all(x == x[0])]
    if constant:
        which = " and ".join(constant)
        result["spearman_note"] = (
            f"undefined: every head has the same mean score in {which} (constant), so there is no ranking to correlate"
        )
        return result
    from scipy.stats import spearmanr  # scipy is heavy; import only when a comparison is made

    res = spearmanr(xa, xb)
    result["spearman"] = float(res.statistic)
    result["spearman_pvalue"] = float(res.pvalue)
    return result


def compare_head_scores(
    a: Mapping[tuple[int, int], Sequence[float]],
    b: Mapping[tuple[int, int], Sequence[float]],
    top: int = 10,
) -> dict[str, Any]:
    """Compare two head-score sets: do they find the same retrieval heads?

    Returns a JSON-friendly dict with
    ``shape_a``, ``shape_b``: ``[layers, heads]``;
    ``top``: the k used (``top``, or fewer if a file has fewer heads); ``top_a``, ``top_b``: ``[layer, head, mean]``;
    ``overlap_count``, ``overlap_fraction`` (= count / k) and ``overlap_heads`` (shared ``[layer, head]``, sorted);
    ``spearman`` (rho of mean scores over the heads both have; NaN where undefined), ``spearman_pvalue``,
    ``spearman_heads`` (how many heads it used) and ``spearman_note`` (why it is NaN, else None).

    Files of different shapes come from different models, where head ``(l, h)`` means nothing in common, so that is
    an error rather than a low overlap.
    """
    top = _check_top(top)
    shape_a, shape_b = head_shape(a), head_shape(b)
    if shape_a != shape_b:
        raise UserInputError(
            f"head-score shapes differ: a is {shape_a[0]}x{shape_a[1]}, b is {shape_b[0]}x{shape_b[1]} "
            f"(layers x heads): compare files from the same model"
        )
    rank_a, rank_b = rank_heads(a), rank_heads(b)
    k = min(top, len(rank_a), len(rank_b))
    top_a, top_b = rank_a[:k], rank_b[:k]
    shared = sorted({(l, h) for l, h, _ in top_a} & {(l, h) for l, h, _ in top_b})
    result: dict[str, Any] = {
        "shape_a": list(shape_a),
        "shape_b": list(shape_b),
        "top": k,
        "top_a": [[l, h, m] for l, h, m in top_a],
        "top_b": [[l, h, m] for l, h, m in top_b],
        "overlap_count": len(shared),
        "overlap_fraction": len(shared) / k,
        "overlap_heads": [[l, h] for l, h in shared],
    }
    result.update(_spearman(a, b))
    return result


def format_comparison(result: Mapping[str, Any], name_a: str, name_b: str) -> str:
    """Markdown for a ``compare_head_scores`` result: both top-k lists side by side, then overlap and Spearman.

    Shared heads are marked with ``*`` so the eye finds them without reading the overlap line.
    """
    k = int(result["top"])
    top_a, top_b = result["top_a"], result["top_b"]
    shared = {tuple(x) for x in result["overlap_heads"]}
    na, nb = _md_cell(name_a), _md_cell(name_b)
    lines = [
        f"Top {k} retrieval heads (layer-head, mean score; * = in both top lists), "
        f"shape {result['shape_a'][0]}x{result['shape_a'][1]}",
        "",
        f"| Rank | {na} | Mean | {nb} | Mean |",
        "|---:|---|---:|---|---:|",
    ]

    def cell(entry: Sequence[Any]) -> tuple[str, str]:
        layer, head, mean = entry
        mark = "*" if (layer, head) in shared else ""
        return f"{layer}-{head}{mark}", f"{float(mean):.3f}"

    for i in range(k):
        ha, ma = cell(top_a[i]) if i < len(top_a) else ("", "")
        hb, mb = cell(top_b[i]) if i < len(top_b) else ("", "")
        lines.append(f"| {i + 1} | {ha} | {ma} | {hb} | {mb} |")
    lines.append("")
    heads = ", ".join(f"{l}-{h}" for l, h in result["overlap_heads"]) or "none"
    lines.append(
        f"Overlap of top {k}: {result['overlap_count']}/{k} ({float(result['overlap_fraction']):.0%}); "
        f"shared: {heads}"
    )
    rho = float(result["spearman"])
    n = result.get("spearman_heads", 0)
    if math.isnan(rho):
        note = result.get("spearman_note") or "undefined"
        lines.append(f"Spearman rank correlation of mean scores over {n} heads: NaN ({note})")
    else:
        pvalue = result.get("spearman_pvalue", math.nan)
        lines.append(f"Spearman rank correlation of mean scores over {n} heads: {rho:.3f} (p = {float(pvalue):.3g})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# several files: which scoring method each holds, and the overlap / Spearman matrix

#: The scoring method of a file with no ``.<score>`` in its name: the paper's copy-paste score.
DEFAULT_SCORE = "copy"
#: What may follow the model name as a score: lower-case letters and ``_``, so the dots of model names such as
#: ``Qwen2.5-3B-Instruct`` or ``Mistral-7B-v0.2-hf`` are never mistaken for one.
_SCORE_RE = re.compile(r"^[a-z][a-z_]*$")
OVERLAP_KS = (10, 20)


def score_label(path: PathLike) -> str:
    """The scoring method a head-score file holds, from its name.

    The detection writes ``head_score/<model>.json`` for the copy score and ``head_score/<model>.<score>.json`` for
    every other (``mass``, ``qr``, ``distant``), so ``smollm2-135m.mass.json`` is ``mass`` and ``smollm2-135m.json``,
    like ``Qwen2.5-3B-Instruct.json``, is ``copy``.
    """
    name = Path(path).name
    stem = name[: -len(".json")] if name.endswith(".json") else Path(name).stem
    _, dot, suffix = stem.rpartition(".")
    return suffix if dot and _SCORE_RE.match(suffix) else DEFAULT_SCORE


def method_labels(paths: Sequence[PathLike]) -> list[str]:
    """One distinct label per file: its score name, else (two files of one score) its file stem, else a number."""
    scores = [score_label(p) for p in paths]
    labels = list(scores)
    for i, path in enumerate(paths):
        if scores.count(scores[i]) > 1:
            stem = Path(path).name
            stem = stem[: -len(".json")] if stem.endswith(".json") else stem
            labels[i] = stem if stem == scores[i] else f"{scores[i]} ({stem})"
    named = list(labels)
    seen: dict[str, int] = {}
    for i, label in enumerate(named):
        if named.count(label) > 1:
            seen[label] = seen.get(label, 0) + 1
            labels[i] = f"{label} #{seen[label]}"
    return labels


def compare_many(
    named: Sequence[tuple[str, Mapping[tuple[int, int], Sequence[float]]]],
    ks: Sequence[int] = OVERLAP_KS,
) -> dict[str, Any]:
    """Every pair of several head-score sets: top-k overlap for each k in ``ks`` and Spearman's rho of mean scores.

    ``named`` is ``[(label, scores), ...]`` (labels from ``method_labels``). Returns a JSON-friendly dict with
    ``names``; ``shape``; ``top`` (each file's ranking in ``names`` order, best first, ``[layer, head, mean]``);
    ``overlap``: ``{k: N x N counts of heads in both top-k lists}``, where k is capped at the smallest file's heads
    (``overlap_k`` maps each asked k to the k used); ``spearman``: N x N rho over the heads both files have (scipy's
    ``spearmanr``), NaN where undefined, with the reasons in ``spearman_notes`` (``"a / b": reason``).
    """
    if len(named) < 2:
        raise UserInputError(f"a comparison needs at least two head-score files, got {len(named)}")
    for k in ks:
        _check_top(k)
    names = [str(name) for name, _ in named]
    shapes = [head_shape(scores) for _, scores in named]
    for name, shape in zip(names[1:], shapes[1:]):
        if shape != shapes[0]:
            raise UserInputError(
                f"head-score shapes differ: {names[0]} is {shapes[0][0]}x{shapes[0][1]}, "
                f"{name} is {shape[0]}x{shape[1]} (layers x heads): compare files from the same model"
            )
    ranks = [rank_heads(scores) for _, scores in named]
    fewest = min(len(r) for r in ranks)
    result: dict[str, Any] = {
        "names": names,
        "shape": list(shapes[0]),
        "top": [[[l, h, m] for l, h, m in rank] for rank in ranks],
        "overlap_k": {},
        "overlap": {},
        "spearman": [],
        "spearman_notes": {},
    }
    for k in ks:
        used = min(int(k), fewest)
        tops = [{(l, h) for l, h, _ in rank[:used]} for rank in ranks]
        result["overlap_k"][int(k)] = used
        result["overlap"][int(k)] = [[len(a & b) for b in tops] for a in tops]
    for i, (name_a, a) in enumerate(named):
        row = []
        for j, (name_b, b) in enumerate(named):
            pair = _spearman(a, b)
            row.append(pair["spearman"])
            if pair["spearman_note"] and i <= j:
                result["spearman_notes"][f"{name_a} / {name_b}"] = pair["spearman_note"]
        result["spearman"].append(row)
    return result


def format_matrix(result: Mapping[str, Any], top: int = 10, files: Sequence[str] | None = None) -> str:
    """Markdown for a ``compare_many`` result: each file's top heads side by side, then one N x N table per
    overlap k and one of Spearman's rho. ``files`` (same order as the names) adds a legend of which file is which."""
    top = _check_top(top)
    names = [_md_cell(n) for n in result["names"]]
    shape = result["shape"]
    lines: list[str] = []
    if files:
        lines.append("Files: " + "; ".join(f"{n} = {_md_cell(str(f))}" for n, f in zip(names, files)))
        lines.append("")
    rankings = result["top"]
    shown = min(top, max(len(r) for r in rankings))
    lines += [
        f"Top {shown} heads of each file (layer-head mean score), shape {shape[0]}x{shape[1]}",
        "",
        "| Rank | " + " | ".join(names) + " |",
        "|---:|" + "---|" * len(names),
    ]
    for i in range(shown):
        cells = [f"{r[i][0]}-{r[i][1]} {float(r[i][2]):.3f}" if i < len(r) else "" for r in rankings]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")

    def matrix(title: str, rows: Sequence[Sequence[Any]], cell) -> None:
        lines.extend(["", title, "", "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)])
        for name, row in zip(names, rows):
            lines.append(f"| {name} | " + " | ".join(cell(v) for v in row) + " |")

    drawn = set()
    for k, rows in result["overlap"].items():
        used = result["overlap_k"][k]
        if used in drawn:  # files with fewer heads than k: k = 10 and k = 20 are the same table
            continue
        drawn.add(used)
        matrix(f"Top-{used} overlap (heads in both top-{used} lists, of {used})", rows, lambda v: str(int(v)))
    matrix(
        "Spearman rank correlation of mean scores (over the heads both files have)",
        result["spearman"],
        lambda v: "NaN" if math.isnan(float(v)) else f"{float(v):.3f}",
    )
    for pair, note in result["spearman_notes"].items():
        lines.append(f"NaN for {_md_cell(pair)}: {note}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# writing


def write_head_scores(
    path: PathLike,
    scores_by_key: Mapping[str, Sequence[float]] | Mapping[tuple[int, int], Sequence[float]],
) -> None:
    """Write ``{"<layer>-<head>": [score, ...]}`` as one line of JSON, atomically, layer-major key order.

    One line because the original analysis snippet reads ``file.readline()``; atomic (temp file in the same
    directory, then ``os.replace``) so an interrupted or parallel run never leaves a half-written file for that
    snippet to choke on; layer-major so the file diffs cleanly and the snippet's stable sort breaks ties the same
    way ``rank_heads`` does. Keys may also be ``(layer, head)`` tuples. The data is validated with the same rules as
    ``load_head_scores``, so nothing is written that cannot be read back.
    """
    where = _where(path)
    if not scores_by_key:
        raise UserInputError(
            f"refusing to write {where}: no head scores were given (no head was measured); check the model run"
        )
    entries: dict[tuple[int, int], list[float]] = {}
    for key, value in scores_by_key.items():
        if isinstance(key, tuple) and len(key) == 2 and all(
            isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 0 for x in key
        ):
            parsed: tuple[int, int] | None = (int(key[0]), int(key[1]))
        else:
            parsed = parse_head_key(key)
        if parsed is None:
            raise UserInputError(
                f"cannot write {where}: key {_short(key)} is not '<layer>-<head>' (e.g. '16-19') or (layer, head)"
            )
        if parsed in entries:
            raise UserInputError(f"cannot write {where}: head {parsed[0]}-{parsed[1]} is given twice; merge its scores")
        entries[parsed] = _check_scores(f"cannot write {where}", str(key), value)

    payload = {f"{layer}-{head}": entries[(layer, head)] for layer, head in sorted(entries)}
    text = json.dumps(payload, allow_nan=False) + "\n"

    atomic_write(path, text, what=f"head scores ({where})")
