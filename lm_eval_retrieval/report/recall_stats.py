"""The recall statistics of one ``ret-approx-hf`` run as a typed value, validated once where they enter.

They enter from the probe (``RetApproxLM.recall_stats()``, a plain dict that also goes into lm-eval's results JSON)
or from a ``recall_stats.json`` file; :meth:`RecallStats.from_dict` checks them there and every table and plot
then takes the :class:`RecallStats` it returns, without checking again. The dict (and file) shape::

    {"model": "smollm2-135m", "approx": "exact_topk", "topk": 10, "layerwise_topk_analysis": True,
     "min_visible_keys": 100,
     "layers": [{"layer": 0, "module": "model.layers.0.self_attn",
                 "queries": [120, ...],            # per head; 0 => that head's values are None
                 "recall": [1.0, ...], "error_norm": [...], "exact_topk_mass": [...], "approx_topk_mass": [...]},
                ...],
     "mass_curve": {"k": [1, 2, 4, ..., 1024], "mass": [[...] per layer]}}

Below both ``report/recall.py`` (tables, files) and ``report/plots.py`` (figures), so neither imports the other for
it. No torch, no matplotlib, no pandas.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Optional

import numpy as np

from lm_eval_retrieval.attention.budget import Budget, parse_budget
from lm_eval_retrieval.errors import UserInputError

__all__ = ["STATS_FILE", "PER_HEAD_KEYS", "VALUE_KEYS", "COST_KEYS", "LayerRecall", "RecallStats", "as_recall_stats"]

#: The statistics file inside a report folder.
STATS_FILE = "recall_stats.json"

#: Per-head lists every layer entry carries (``queries`` first: it says which heads counted).
PER_HEAD_KEYS = ("queries", "recall", "error_norm", "exact_topk_mass", "approx_topk_mass")
VALUE_KEYS = PER_HEAD_KEYS[1:]
#: Per-head cost lists, as fractions of each query's visible keys: the keys the output attends, and the work spent
#: choosing them in key-vector equivalents. Optional: files written before they were measured lack them.
COST_KEYS = ("attended", "scanned")

_REQUIRED_KEYS = ("model", "approx", "topk", "layerwise_topk_analysis", "layers", "mass_curve")

Values = tuple[Optional[float], ...]


@dataclass(frozen=True)
class LayerRecall:
    """One attention module's per-head measurements; a head that counted no query has None values."""

    layer: Any
    module: str
    queries: tuple[int, ...]
    recall: Values
    error_norm: Values
    exact_topk_mass: Values
    approx_topk_mass: Values
    attended: Values = ()
    scanned: Values = ()

    @property
    def heads(self) -> int:
        return len(self.queries)

    def values(self, key: str) -> tuple:
        """The per-head list named ``key`` (one of :data:`PER_HEAD_KEYS` or :data:`COST_KEYS`)."""
        if key in COST_KEYS:
            return getattr(self, key) or (None,) * self.heads
        if key not in PER_HEAD_KEYS:
            known = ", ".join((*PER_HEAD_KEYS, *COST_KEYS))
            raise UserInputError(f"unknown per-head statistic {key!r}; use one of {known}")
        return getattr(self, key)


@dataclass(frozen=True)
class RecallStats:
    """Validated recall statistics: plain ints and floats, None for 'not measured', defaults filled in."""

    model: str
    approx: str
    topk: int | str  # keys per query, or a share of each query's visible keys such as "5%"
    layerwise_topk_analysis: bool
    min_visible_keys: int
    layers: tuple[LayerRecall, ...]
    mass_k: tuple[int, ...]
    mass: tuple[Values, ...]  # one row per layer, one value per k
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # other keys, kept for round trips

    @classmethod
    def from_dict(cls, stats: Any, where: Any = "recall statistics") -> "RecallStats":
        """Check a statistics dict (see the module docstring) and build the typed value.

        Raises a one-line :class:`UserInputError` that starts with ``where`` (a path when the stats came from a file)
        for anything missing or malformed. Layers may have different head counts (some models do); every per-head
        list of one layer must have the same length, and the mass curve needs one row per layer and one value per k.
        """
        if isinstance(stats, RecallStats):
            return stats
        return _validate(stats, _where(where))

    def to_dict(self) -> dict[str, Any]:
        """The statistics as the JSON object of ``recall_stats.json`` (lists, plain numbers, None for missing)."""
        out: dict[str, Any] = dict(self.extra)
        out.update(
            {
                "model": self.model,
                "approx": self.approx,
                "topk": self.topk,
                "layerwise_topk_analysis": self.layerwise_topk_analysis,
                "min_visible_keys": self.min_visible_keys,
                "layers": [
                    {
                        "layer": layer.layer,
                        "module": layer.module,
                        **{k: list(layer.values(k)) for k in (*PER_HEAD_KEYS, *COST_KEYS)},
                    }
                    for layer in self.layers
                ],
                "mass_curve": {"k": list(self.mass_k), "mass": [list(row) for row in self.mass]},
            }
        )
        return out

    @property
    def total_queries(self) -> int:
        """All counted (query, head, layer) measurements."""
        return sum(sum(layer.queries) for layer in self.layers)

    @property
    def max_heads(self) -> int:
        return max(layer.heads for layer in self.layers)

    def head_counts(self) -> list[int]:
        """Query counts of the heads that counted any, over all layers."""
        return [q for layer in self.layers for q in layer.queries if q > 0]


def as_recall_stats(stats: Any, where: Any = "recall statistics") -> RecallStats:
    """``stats`` as a :class:`RecallStats`: returned as is when it already is one, else validated once here."""
    return RecallStats.from_dict(stats, where)


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


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


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


def _layer_name(index: int, entry: Any) -> str:
    module = entry.get("module") if isinstance(entry, Mapping) else None
    return f"layer {index} ({module!r})" if isinstance(module, str) else f"layer {index}"


def _validate_layer(where: str, index: int, entry: Any) -> LayerRecall:
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
        if not _is_list(value):
            raise UserInputError(
                f"{where}: {name} {key} is {_short(value)}, expected a list with one value per head; fix the statistics"
            )
        lists[key] = list(value)
    heads = len(lists["queries"])
    if heads == 0:
        raise UserInputError(f"{where}: {name} has no heads (empty 'queries' list); rerun the measurement")
    for key in VALUE_KEYS:
        if len(lists[key]) != heads:
            raise UserInputError(
                f"{where}: {name} has {len(lists[key])} {key} value(s) but {heads} query counts; "
                f"every per-head list must have one value per head"
            )
    for key in COST_KEYS:
        value = entry.get(key)
        if value is None:
            continue
        if not _is_list(value) or len(value) != heads:
            raise UserInputError(
                f"{where}: {name} {key} is {_short(value)}, expected a list with one value per head; fix the statistics"
            )
        lists[key] = list(value)
    queries = tuple(_count(where, f"{name} queries[{h}]", q) for h, q in enumerate(lists["queries"]))
    values = {}
    for key in (*VALUE_KEYS, *(k for k in COST_KEYS if k in lists)):
        checked = [_value(where, f"{name} {key}[{h}]", v) for h, v in enumerate(lists[key])]
        # A head that counted no query has no measurement, whatever number the list holds.
        values[key] = tuple(v if q > 0 else None for v, q in zip(checked, queries))
    for key in COST_KEYS:
        values.setdefault(key, (None,) * heads)  # not measured by the run that wrote the file
    return LayerRecall(layer=entry.get("layer", index), module=entry["module"], queries=queries, **values)


def _budget(where: str, value: Any) -> Budget:
    """`topk` as written by ret-approx-hf: a positive number of keys, or a share such as "5%"."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            return parse_budget(value)
        except UserInputError:
            raise UserInputError(f"{where}: topk is {_short(value)}, expected a share above 0% and at most 100%") from None
    return Budget(tokens=_count(where, "topk", value, positive=True))


def _validate(stats: Any, where: str) -> RecallStats:
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
    budget = _budget(where, stats["topk"])
    topk = budget.json_value()
    min_visible = stats.get("min_visible_keys")
    if min_visible is None:
        min_visible = budget.default_min_visible_keys()
    else:
        min_visible = _count(where, "min_visible_keys", min_visible)
    layerwise = stats["layerwise_topk_analysis"]
    if not isinstance(layerwise, (bool, np.bool_)):
        raise UserInputError(
            f"{where}: layerwise_topk_analysis is {_short(layerwise)}, expected true or false; fix the statistics"
        )

    raw_layers = stats["layers"]
    if not _is_list(raw_layers) or len(raw_layers) == 0:
        raise UserInputError(
            f"{where}: 'layers' must be a non-empty list (one entry per attention module), found {_short(raw_layers)}; "
            f"rerun the measurement"
        )
    layers = tuple(_validate_layer(where, index, entry) for index, entry in enumerate(raw_layers))

    curve = stats["mass_curve"]
    if not isinstance(curve, Mapping) or "k" not in curve or "mass" not in curve:
        raise UserInputError(
            f"{where}: 'mass_curve' must be an object with 'k' and 'mass' lists, found {_short(curve)}; "
            f"rerun the measurement"
        )
    ks_raw, mass_raw = curve["k"], curve["mass"]
    if not _is_list(ks_raw) or len(ks_raw) == 0:
        raise UserInputError(f"{where}: mass_curve k is {_short(ks_raw)}, expected a non-empty list of key counts")
    ks = tuple(_count(where, f"mass_curve k[{i}]", k, positive=True) for i, k in enumerate(ks_raw))
    if any(b <= a for a, b in zip(ks, ks[1:])):
        raise UserInputError(f"{where}: mass_curve k {_short(list(ks))} is not strictly increasing; fix the statistics")
    if not _is_list(mass_raw) or len(mass_raw) != len(layers):
        count = len(mass_raw) if _is_list(mass_raw) else None
        raise UserInputError(
            f"{where}: mass_curve mass has {count if count is not None else 'no'} row(s) for {len(layers)} layers; "
            f"it needs one row per layer"
        )
    mass = []
    for index, row in enumerate(mass_raw):
        if not _is_list(row) or len(row) != len(ks):
            raise UserInputError(
                f"{where}: mass_curve mass row {index} is {_short(row)}, expected {len(ks)} values (one per k)"
            )
        mass.append(tuple(_value(where, f"mass_curve mass[{index}][{i}]", v) for i, v in enumerate(row)))

    extra = {key: value for key, value in stats.items() if key not in (*_REQUIRED_KEYS, "min_visible_keys")}
    return RecallStats(
        model=str(stats["model"]),
        approx=str(stats["approx"]),
        topk=topk,
        layerwise_topk_analysis=bool(layerwise),
        min_visible_keys=min_visible,
        layers=layers,
        mass_k=ks,
        mass=tuple(mass),
        extra=MappingProxyType(extra),
    )
