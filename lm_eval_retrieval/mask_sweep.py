"""The causal test of the Retrieval Head paper: mask the top-K retrieval heads, or K random others, and watch NIAH.

One model load for the whole sweep: the mask is swapped between runs (`set_head_mask`), and each run is a plain
`lm_eval.simple_evaluate` over the same documents. K = 0 is the unmasked baseline, run once and shared by both curves.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from .errors import UserInputError
from .models.masking import select_heads
from .paths import tasks_dir
from .report.files import atomic_write

METRICS = ("needle_found", "rouge1_recall")


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in str(text).split(",") if k.strip()})
    except ValueError:
        raise UserInputError(f"--ks must be comma-separated numbers of heads, e.g. 0,5,10,20,30; got {text!r}")
    if not ks or ks[0] < 0:
        raise UserInputError(f"--ks must be non-negative numbers of heads, got {text!r}")
    return ks


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


def run_mask_sweep(
    model_args: dict[str, Any],
    head_scores: str,
    ks: list[int],
    tasks: list[str],
    output_dir: str,
    metadata: dict[str, Any] | None = None,
    seed: int = 0,
    mode: str = "uniform",
    limit: float | None = None,
    use_cache: str | None = None,
) -> pd.DataFrame:
    """Runs every (kind, K), writes `mask_sweep.csv`, `mask_sweep.png` and one NIAH heatmap per run; returns the table."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from .models.head_trace import RetrievalHeadLM
    from .report.niah_plot import niah_heatmap
    from .report.plots import save_png

    out = Path(output_dir)
    lm = RetrievalHeadLM(**model_args, output_path=str(out / "runs"))
    shape = (lm.hook_state.num_layers, lm.hook_state.num_heads)
    runs = [("none", 0)] + [(kind, k) for k in ks if k > 0 for kind in ("top", "random")]
    selections = {(kind, k): _heads(kind, k, shape, head_scores, seed) for kind, k in runs}  # fail before running
    task_manager = TaskManager(include_path=tasks_dir(), metadata={**model_args, **(metadata or {})})
    rows = []
    for kind, k in tqdm(runs, desc="Masking sweep"):
        heads = selections[(kind, k)]
        lm.set_head_mask(heads, mode)
        lm.reset_scores()
        lm.output_dir = str(out / "runs" / f"{kind}-{k}")
        result = simple_evaluate(
            model=lm, tasks=tasks, task_manager=task_manager, limit=limit, log_samples=True, use_cache=use_cache
        )
        for task in tasks:
            metrics = result["results"][task]
            row = {"kind": kind, "k": k, "task": task}
            row.update({name: metrics[f"{name},none"] for name in METRICS})
            row["heads"] = ";".join(f"{layer}-{head}" for layer, head in heads)
            rows.append(row)
            figure = niah_heatmap(samples_frame(result["samples"][task], task), title=f"{task}: {kind} {k} heads masked")
            save_png(figure, out / f"niah_{task}_{kind}_{k}.png")
    lm.set_head_mask([], mode)
    table = pd.DataFrame(rows)
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    atomic_write(out / "mask_sweep.csv", buffer.getvalue(), what="the masking sweep table")
    save_png(sweep_figure(table), out / "mask_sweep.png")
    atomic_write(out / "mask_sweep.json", json.dumps(rows, indent=1), what="the masking sweep table")
    return table


def _heads(kind: str, k: int, shape: tuple[int, int], head_scores: str, seed: int) -> list[tuple[int, int]]:
    if kind == "none":
        return []
    if kind == "top":
        return select_heads(shape, mask_topk=k, head_scores=head_scores)
    return select_heads(shape, mask_random=k, head_scores=head_scores, seed=seed)


def sweep_figure(table: pd.DataFrame, metric: str = "rouge1_recall"):
    """NIAH score against K: one curve for the top-K retrieval heads, one for K random other heads."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 4.2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    baseline = table[table["kind"] == "none"]
    for kind, style, label in (("top", "o-", "top-K retrieval heads"), ("random", "s--", "K random other heads")):
        part = pd.concat([baseline, table[table["kind"] == kind]]).groupby("k")[metric].mean()
        axes.plot(part.index, part.values, style, label=label)
    axes.set_xlabel("K heads masked")
    axes.set_ylabel("NIAH ROUGE-1 recall" if metric == "rouge1_recall" else "needle found (fraction)")
    axes.set_ylim(0, 100 if metric == "rouge1_recall" else 1)
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title("Masking retrieval heads vs random heads")
    figure.tight_layout()
    return figure


def default_output_dir(head_scores: str) -> str:
    return os.path.join("results", "mask-sweep-" + Path(head_scores).stem)
