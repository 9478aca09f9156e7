"""`lm-eval-retrieval leaderboard`: every approximation at every budget, end to end, measured the same way.

One model load for the whole board. Each run is `ret-approx-hf` with `layerwise_topk_analysis=False` (the
approximate output is handed on, so the task metrics show what the approximation costs end to end) through a plain
`lm_eval.simple_evaluate` over the same documents; a first run with exact attention (no approximation) is the
baseline the perplexity delta is taken against. Per run, the analysis gives the mean Recall@k, error norm and
approximate mass, and the cost: attended and scanned, as percentages of each query's visible keys (means over every
counted query, layer and head; every run counts the same queries: those with at least `min_visible_keys` visible keys,
by default 10 x the smallest budget; budgets are keys per query (`32`) or shares of each query's visible keys
(`5%`)). Written: `leaderboard.csv`, `leaderboard.md`, `leaderboard.png` (recall against
scanned %, one curve per method; NIAH accuracy against the budget where a NIAH task ran) and each run's own reports
under `runs/<method>-<budget>/`. With `use_cache`, a run whose row was already written is read back, not rerun.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from .attention.budget import Budget, parse_budget
from .attention.hook import probes_replaced
from .errors import UserInputError
from .paths import tasks_dir
from .report.files import atomic_write

EXACT = "exact"
TASK_METRICS = ("word_perplexity", "needle_found", "rouge1_recall")
ANALYSIS = ("recall", "error_norm", "approx_topk_mass", "attended", "scanned")


def parse_methods(text: str) -> list[str]:
    """`streaming,quest,my_pkg.mod:fn` -> names, each checked now (before the model loads)."""
    from .attention.approx import resolve_approx

    methods = [m.strip() for m in str(text).split(",") if m.strip()]
    if not methods:
        raise UserInputError("--methods needs at least one approximation, e.g. --methods streaming,quest,sparq")
    for method in methods:
        resolve_approx(method)
    return methods


def parse_budgets(text: str) -> list[Budget]:
    """`32,128,5%` -> budgets in keys (smallest first), then shares of the visible keys (smallest first)."""
    parts = [b.strip() for b in str(text).split(",") if b.strip()]
    if not parts:
        raise UserInputError(f"--budgets needs at least one budget, e.g. --budgets 32,128,5%; got {text!r}")
    budgets = {parse_budget(part, "--budgets") for part in parts}
    return sorted(budgets, key=lambda b: (b.is_share, b.percent, b.tokens))


def shared_min_visible_keys(budgets: list[Budget]) -> int:
    """One query population for every budget: the seed's 10 k rule at the smallest budget in keys (or, with shares
    only, where the smallest share reaches 10 keys), so a large budget is not measured on long documents only."""
    tokens = [b for b in budgets if not b.is_share]
    return (tokens[0] if tokens else budgets[0]).default_min_visible_keys()


def budget_label(value: Any) -> str:
    """A row's budget as written: 32 (or 32.0, where pandas made the column float), "32" or "5%"; "-" for none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def budget_order(value: Any) -> tuple[int, float]:
    """Sort key of a row's budget (see `budget_label`; exact attention's none last)."""
    label = budget_label(value)
    if label == "-":
        return (2, 0.0)
    budget = parse_budget(label)
    return (int(budget.is_share), budget.percent or float(budget.tokens))


def run_leaderboard(
    model_args: dict[str, Any],
    methods: list[str],
    budgets: list[Budget | int | str],
    tasks: list[str],
    output_dir: str,
    metadata: dict[str, Any] | None = None,
    limit: float | None = None,
    use_cache: bool = False,
    approx_args: dict[str, str] | None = None,
) -> pd.DataFrame:
    """Runs the exact baseline and every (method, budget); writes the board and returns it."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from .models.ret_approx import RetApproxLM

    out = Path(output_dir)
    budgets = [parse_budget(b, "budgets") for b in budgets]
    runs: list[tuple[str, Budget | None]] = [(EXACT, None)] + [(m, b) for m in methods for b in budgets]
    lm = None
    task_manager = None
    rows = []
    for method, budget in tqdm(runs, desc="Leaderboard"):
        cached = out / "runs" / _run_name(method, budget) / "row.json"
        if use_cache and cached.is_file():
            rows.append(json.loads(cached.read_text()))
            continue
        if lm is None:
            # One query population for every budget (a user's min_visible_keys wins).
            options = {"min_visible_keys": shared_min_visible_keys(budgets), **model_args}
            options.update(layerwise_topk_analysis=False, topk=budgets[0].json_value())
            lm = RetApproxLM(**options, output_path=str(out / "runs"))
            task_manager = TaskManager(include_path=tasks_dir(), metadata={**model_args, **(metadata or {})})
        lm.output_dir = str(out / "runs" / _run_name(method, budget))
        active = list(lm.hook_state.probes)
        if method == EXACT:  # plain attention: no probe, so no recall reports either
            active.remove(lm.probe)
            lm.write_reports = lambda: None
        else:
            lm.configure(method, budget, (approx_args or {}).get(method))
        try:
            with probes_replaced(lm.hook_state, active):
                result = simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, limit=limit)
        finally:
            lm.__dict__.pop("write_reports", None)
        row = {"method": method, "budget": None if budget is None else budget.json_value()}
        row.update(_analysis_means(lm) if method != EXACT else {})
        row.update(_task_metrics(result, tasks))
        atomic_write(cached, json.dumps(row, indent=1), what="a leaderboard row")
        rows.append(row)
    table = _with_deltas(pd.DataFrame(rows))
    write_leaderboard(table, out)
    return table


def _run_name(method: str, budget: Budget | None) -> str:
    if budget is None:
        return EXACT
    return f"{method.replace(':', '_').replace('/', '_')}-{budget.label().replace('%', 'pct')}"


def _analysis_means(lm: Any) -> dict[str, float | None]:
    """Means over every counted (query, layer, head), in percent for the cost columns."""
    stats = lm.probe.stats
    counted = float(stats.queries.sum())
    means: dict[str, float | None] = {}
    for name in ANALYSIS:
        value = float(stats.sums[name].sum()) / counted if counted else math.nan
        scale = 100.0 if name in ("attended", "scanned") else 1.0
        means[f"{name}_pct" if scale == 100.0 else name] = None if math.isnan(value) else value * scale
    means["queries"] = int(counted)
    groups = lm._head_group_stats(stats).get("retrieval_heads")  # with head_scores=: its top heads against the rest
    if groups:
        means["retrieval_heads_recall"] = groups["retrieval"]["recall"]
        means["other_heads_recall"] = groups["others"]["recall"]
    return means


def _task_metrics(result: dict[str, Any], tasks: list[str]) -> dict[str, float]:
    found: dict[str, float] = {}
    for task in tasks:
        for metric in TASK_METRICS:
            value = result["results"].get(task, {}).get(f"{metric},none")
            if isinstance(value, (int, float)):
                found[metric if len(tasks) == 1 else f"{task}:{metric}"] = float(value)
    return found


def _with_deltas(table: pd.DataFrame) -> pd.DataFrame:
    """Perplexity columns get their delta against the exact baseline."""
    exact = table[table["method"] == EXACT]
    for column in [c for c in table.columns if c.endswith("word_perplexity")]:
        if not exact.empty and pd.notna(exact[column].iloc[0]):
            table[f"{column}_delta"] = table[column] - exact[column].iloc[0]
    return table


def write_leaderboard(table: pd.DataFrame, out: Path) -> list[Path]:
    from .report.plots import save_png

    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    atomic_write(out / "leaderboard.csv", buffer.getvalue(), what="the leaderboard")
    atomic_write(out / "leaderboard.md", leaderboard_markdown(table), what="the leaderboard")
    save_png(leaderboard_figure(table), out / "leaderboard.png")
    return [out / "leaderboard.csv", out / "leaderboard.md", out / "leaderboard.png"]


def leaderboard_markdown(table: pd.DataFrame) -> str:
    """The board as a Markdown table: counts as integers, measurements with 3 decimals, n/a where not measured."""

    def cell(column: str, value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a" if column != "budget" else "-"
        if column == "budget":
            return budget_label(value)
        if column == "queries":
            return str(int(value))
        if isinstance(value, (int, float)):
            return f"{value:+.3f}" if column.endswith("_delta") else f"{value:.3f}"
        return str(value)

    shown = pd.DataFrame({c: [cell(c, v) for v in table[c]] for c in table.columns})
    align = ["left"] + ["right"] * (len(shown.columns) - 1)
    return shown.to_markdown(index=False, colalign=align, disable_numparse=True) + "\n"


def leaderboard_figure(table: pd.DataFrame):
    """Recall against scanned % (one curve per method, one point per budget); NIAH accuracy against the budget."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    niah = [c for c in table.columns if c.endswith("needle_found")]
    figure = Figure(figsize=(11 if niah else 6, 4.2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 2 if niah else 1, 1)
    approximations = table[table["method"] != EXACT]
    approximations = approximations.assign(_order=[budget_order(b) for b in approximations["budget"]])
    approximations = approximations.sort_values("_order", kind="stable")
    for method, part in approximations.groupby("method", sort=False):
        axes.plot(part["scanned_pct"], part["recall"], "o-", label=method)
    axes.set_xlabel("scanned (% of visible keys, key-vector equivalents)")
    axes.set_ylabel("mean Recall@k")
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title("Quality against cost")
    if niah:
        right = figure.add_subplot(1, 2, 2)
        column = niah[0]
        # One position per budget, in order (keys first, then shares of the visible keys): mixed units share no scale.
        labels = sorted({budget_label(b) for b in approximations["budget"]}, key=budget_order)
        position = {label: i for i, label in enumerate(labels)}
        for method, part in approximations.groupby("method", sort=False):
            right.plot([position[budget_label(b)] for b in part["budget"]], part[column], "o-", label=method)
        exact = table[table["method"] == EXACT]
        if not exact.empty:
            right.axhline(float(exact[column].iloc[0]), color="black", linestyle="--", label="exact attention")
        right.set_xticks(range(len(labels)), labels)
        right.set_xlabel("budget (keys per query, or % of the visible keys)")
        right.set_ylabel("NIAH needle found (fraction)")
        right.set_ylim(0, 1.02)
        right.grid(alpha=0.3)
        right.legend(fontsize=8)
        right.set_title("Needle retrieval against budget")
    figure.tight_layout()
    return figure
