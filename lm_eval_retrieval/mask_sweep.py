"""The causal test of the Retrieval Head paper: mask the top-K heads of a head-score file, or K random others, and
watch NIAH; for several files (one per scoring method) against the same random control drawn with several seeds.

One model load for the whole sweep: the mask is swapped between runs (`set_head_mask`), and each run is a plain
`lm_eval.simple_evaluate` over the same documents. K = 0 is the unmasked baseline, run once and shared by every curve;
a set of heads that two runs share (two methods agreeing on their top K) is evaluated once.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from .errors import UserInputError
from .models.masking import select_heads
from .paths import tasks_dir
from .report.files import atomic_write
from .report.heads import head_shape, load_head_scores, method_labels, score_label

METRICS = ("needle_found", "rouge1_recall")
COLUMNS = ("kind", "method", "k", "seed", "task", *METRICS, "file", "heads")


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in str(text).split(",") if k.strip()})
    except ValueError:
        raise UserInputError(f"--ks must be comma-separated numbers of heads, e.g. 0,5,10,20,30; got {text!r}")
    if not ks or ks[0] < 0:
        raise UserInputError(f"--ks must be non-negative numbers of heads, got {text!r}")
    return ks


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]: the seeds of the random control, each a separate draw of K heads."""
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise UserInputError(f"--seeds must be comma-separated integers, e.g. 0,1,2; got {text!r}")
    if not seeds or min(seeds) < 0:
        raise UserInputError(f"--seeds must be non-negative integers, e.g. 0,1,2; got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise UserInputError(f"--seeds {text!r} repeats a seed, which draws the same heads again; give distinct seeds")
    return seeds


def samples_frame(samples: list[dict[str, Any]], task: str) -> pd.DataFrame:
    """lm-eval's logged samples of a NIAH task as the table the heatmaps read."""
    rows = [
        {
            "context_length": s["doc"]["context_length"],
            "length": s["doc"]["length"],
            "depth": s["doc"]["depth"],
            "rouge1_recall": s["rouge1_recall"],
            "needle_found": s["needle_found"],
            "task": task,
        }
        for s in samples
    ]
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------------------------
# the plan: which heads each run masks (no model needed)


@dataclass(frozen=True)
class SweepRun:
    """One evaluation of the sweep: `kind` none (K = 0), top (a file's top K) or random (K random heads, one seed)."""

    kind: str
    method: str  # "none", the file's scoring method (copy, mass, ...), or "random"
    k: int
    heads: tuple[tuple[int, int], ...]
    name: str  # what its heatmap and run folder are called: none_0, top_5 / top-mass_5, random_5 / random-seed1_5
    file: str = ""
    seed: int | None = None


def check_head_score_files(paths: Sequence[str]) -> tuple[int, int]:
    """Every file readable and of one shape, before the model loads (a typo costs seconds, not a model load)."""
    if not paths:
        raise UserInputError("--head_scores needs at least one head-score file")
    repeated = sorted({p for p in paths if list(paths).count(p) > 1})
    if repeated:
        raise UserInputError(f"--head_scores lists {repeated[0]} twice; give each file once")
    shapes = [head_shape(load_head_scores(p)) for p in paths]
    for path, shape in zip(paths[1:], shapes[1:]):
        if shape != shapes[0]:
            raise UserInputError(
                f"--head_scores: {paths[0]} is {shapes[0][0]}x{shapes[0][1]} and {path} is {shape[0]}x{shape[1]} "
                "(layers x heads): give files of one model"
            )
    return shapes[0]


def plan_sweep(
    shape: tuple[int, int], head_scores: Sequence[str], ks: Sequence[int], seeds: Sequence[int]
) -> list[SweepRun]:
    """Every run of the sweep, in order: the unmasked baseline, then for each K > 0 each file's top K and K random
    heads per seed.

    The random heads of one (K, seed) are drawn, as `mask_random=K,seed=S` draws them for one file, from the heads
    outside the top K, here outside the top K of *every* file given, so that the control holds no head any method
    ranks in its top K; with one file the draw is exactly `select_heads(shape, mask_random=K, seed=S, ...)`.
    """
    paths = [str(p) for p in head_scores]
    labels = method_labels(paths)
    ranked = {p: select_heads(shape, mask_topk=shape[0] * shape[1], head_scores=p) for p in paths}  # checks the shape
    universe = {head for heads in ranked.values() for head in heads}
    several_files, several_seeds = len(paths) > 1, len(seeds) > 1
    runs = [SweepRun("none", "none", 0, (), "none_0")]
    for k in ks:
        if k <= 0:
            continue
        for path, label in zip(paths, labels):
            name = f"top-{_file_safe(label)}_{k}" if several_files else f"top_{k}"
            runs.append(SweepRun("top", label, k, tuple(ranked[path][:k]), name, file=path))
        excluded = {head for path in paths for head in ranked[path][:k]}
        pool = sorted(universe - excluded)
        if k > len(pool):
            raise UserInputError(
                f"K={k} random heads: only {len(pool)} heads lie outside the top {k} of "
                f"{'every file' if several_files else 'the file'}; use a smaller K"
            )
        for seed in seeds:
            heads = tuple(sorted(random.Random(int(seed)).sample(pool, k)))
            name = f"random-seed{seed}_{k}" if several_seeds else f"random_{k}"
            runs.append(SweepRun("random", "random", k, heads, name, seed=int(seed)))
    return runs


def _file_safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in label)


# --------------------------------------------------------------------------------------------------------------------
# running


def run_mask_sweep(
    model_args: dict[str, Any],
    head_scores: str | Sequence[str],
    ks: list[int],
    tasks: list[str],
    output_dir: str,
    metadata: dict[str, Any] | None = None,
    seed: int = 0,
    mode: str = "uniform",
    limit: float | None = None,
    use_cache: str | None = None,
    seeds: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Runs every run of `plan_sweep`, writes `mask_sweep.csv` / `.json`, `mask_sweep.png` and one NIAH heatmap per
    run; returns the table (one row per run and task). `seeds` (default `[seed]`) are the random control's draws."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from .models.head_trace import RetrievalHeadLM
    from .report.niah_plot import niah_heatmap
    from .report.plots import save_png

    paths = [head_scores] if isinstance(head_scores, (str, os.PathLike)) else [str(p) for p in head_scores]
    seeds = [int(seed)] if seeds is None else [int(s) for s in seeds]
    check_head_score_files(paths)
    out = Path(output_dir)
    lm = RetrievalHeadLM(**model_args, output_path=str(out / "runs"))
    shape = (lm.hook_state.num_layers, lm.hook_state.num_heads)
    runs = plan_sweep(shape, paths, ks, seeds)  # every selection checked before the first run
    task_manager = TaskManager(include_path=tasks_dir(), metadata={**model_args, **(metadata or {})})
    rows, evaluated = [], {}
    for run in tqdm(runs, desc="Masking sweep"):
        result = evaluated.get(run.heads)
        if result is None:
            lm.set_head_mask(list(run.heads), mode)
            lm.reset_scores()
            lm.output_dir = str(out / "runs" / run.name)
            result = simple_evaluate(
                model=lm, tasks=tasks, task_manager=task_manager, limit=limit, log_samples=True, use_cache=use_cache
            )
            evaluated[run.heads] = result
        for task in tasks:
            metrics = result["results"][task]
            row = {"kind": run.kind, "method": run.method, "k": run.k, "seed": run.seed, "task": task}
            row.update({name: metrics[f"{name},none"] for name in METRICS})
            row["file"] = run.file
            row["heads"] = ";".join(f"{layer}-{head}" for layer, head in run.heads)
            rows.append(row)
            title = f"{task}: {run.name.replace('_', ' ')} heads masked"
            save_png(niah_heatmap(samples_frame(result["samples"][task], task), title=title),
                     out / f"niah_{task}_{run.name}.png")
    lm.set_head_mask([], mode)
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table["seed"] = table["seed"].astype("Int64")  # empty, not NaN or 0.0, where a run has no seed
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    atomic_write(out / "mask_sweep.csv", buffer.getvalue(), what="the masking sweep table")
    save_png(sweep_figure(table), out / "mask_sweep.png")
    atomic_write(out / "mask_sweep.json", json.dumps(rows, indent=1), what="the masking sweep table")
    return table


# --------------------------------------------------------------------------------------------------------------------
# the figure


def sweep_curves(table: pd.DataFrame, metric: str) -> dict[str, pd.DataFrame]:
    """What `mask_sweep.png` draws for one metric, averaged over tasks: for each scoring method a curve `k -> value`
    (the baseline at K = 0), and for `random` the mean, min and max over the seeds at each K."""
    per_run = table.groupby(["kind", "method", "k", "seed"], dropna=False)[metric].mean().reset_index()
    baseline = per_run[per_run["kind"] == "none"][metric]
    base = float(baseline.iloc[0]) if len(baseline) else None
    curves: dict[str, pd.DataFrame] = {}
    for method in dict.fromkeys(per_run.loc[per_run["kind"] == "top", "method"]):
        part = per_run[(per_run["kind"] == "top") & (per_run["method"] == method)][["k", metric]]
        if base is not None:
            part = pd.concat([pd.DataFrame({"k": [0], metric: [base]}), part])
        curves[method] = part.groupby("k")[metric].agg(["mean", "min", "max"])
    random_runs = per_run[per_run["kind"] == "random"][["k", metric]]
    if len(random_runs):
        if base is not None:
            random_runs = pd.concat([pd.DataFrame({"k": [0], metric: [base]}), random_runs])
        curves["random"] = random_runs.groupby("k")[metric].agg(["mean", "min", "max"])
    return curves


def sweep_figure(table: pd.DataFrame):
    """NIAH ROUGE-1 recall and needle-found rate against K: one curve per scoring method's top-K heads, and the
    random control as its mean over the seeds with a min-max band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(figure)
    seeds = table.loc[table["kind"] == "random", "seed"].nunique()
    for index, (metric, label, top) in enumerate(
        (("rouge1_recall", "NIAH ROUGE-1 recall", 100), ("needle_found", "needle found (fraction)", 1))
    ):
        axes = figure.add_subplot(1, 2, index + 1)
        curves = sweep_curves(table, metric)
        for method, curve in curves.items():
            if method == "random":
                continue
            axes.plot(curve.index, curve["mean"], "o-", label=f"top-K {method} heads")
        if "random" in curves:
            curve = curves["random"]
            line = axes.plot(curve.index, curve["mean"], "s--", color="0.35",
                             label=f"K random heads (mean of {seeds} seed{'s' if seeds != 1 else ''})")
            if seeds > 1:
                axes.fill_between(curve.index, curve["min"], curve["max"], color=line[0].get_color(), alpha=0.2,
                                  label="random: min-max over seeds")
        axes.set_xlabel("K heads masked")
        axes.set_ylabel(label)
        axes.set_ylim(-0.03 * top, 1.03 * top)  # curves at 0 or at the top stay visible
        axes.grid(alpha=0.3)
        if index == 0:
            axes.legend(fontsize=8)
    figure.suptitle("Masking each method's top-K heads vs K random heads")
    figure.tight_layout()
    return figure


def default_output_dir(head_scores: str | Sequence[str]) -> str:
    """results/mask-sweep-<file stem> for one file, results/mask-sweep-<model> for several."""
    paths = [head_scores] if isinstance(head_scores, (str, os.PathLike)) else list(head_scores)
    name = Path(paths[0]).name
    stem = name[: -len(".json")] if name.endswith(".json") else Path(name).stem
    if len(paths) > 1 and score_label(paths[0]) != "copy":
        stem = stem.rsplit(".", 1)[0]  # <model>.<score> -> <model>
    return os.path.join("results", "mask-sweep-" + stem)
