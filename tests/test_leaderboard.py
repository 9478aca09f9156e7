"""`lm-eval-retrieval leaderboard`: every method x budget end to end on one loaded (tiny) model, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import lm_eval
from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.leaderboard import parse_budgets, parse_methods, run_leaderboard

TASK_METADATA = {"doc_sentences": 12}


@pytest.fixture(scope="module")
def board(tiny_model_dir: str, tmp_path_factory) -> tuple[pd.DataFrame, Path, dict]:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("board")
    model_args = {"pretrained": tiny_model_dir, "dtype": "float32"}
    table = run_leaderboard(
        model_args, ["streaming", "quest"], [2, 6, "30%"], ["retrieval_ppl_en"], str(out), metadata=TASK_METADATA,
        limit=2,
    )
    return table, out, model_args


def test_one_row_per_run_with_quality_cost_and_task_metric(board) -> None:  # type: ignore[no-untyped-def]
    table, out, _ = board
    assert list(zip(table["method"], table["budget"].fillna("-").astype(str))) == [
        ("exact", "-"), ("streaming", "2"), ("streaming", "6"), ("streaming", "30%"),
        ("quest", "2"), ("quest", "6"), ("quest", "30%"),
    ]  # fmt: skip
    exact = table[table["method"] == "exact"].iloc[0]
    assert exact["word_perplexity_delta"] == 0 and pd.isna(exact["recall"])
    runs = table[table["method"] != "exact"].set_index(["method", "budget"])
    assert runs["queries"].nunique() == 1 and runs["queries"].iloc[0] > 0  # every budget counts the same queries
    assert (runs["scanned_pct"].loc["streaming"] == 0).all()  # positions only
    assert (runs["scanned_pct"].loc["quest"] > 0).all()
    for method in ("streaming", "quest"):  # a larger budget attends more keys and recalls more of the exact top-k
        small, large = runs.loc[(method, 2)], runs.loc[(method, 6)]
        share = runs.loc[(method, "30%")]  # about 30% of each query's keys: more than 2 of the >= 20 keys counted
        assert share["attended_pct"] > small["attended_pct"] and 29 < share["attended_pct"] < 40
        assert large["attended_pct"] > small["attended_pct"]
        assert 0 <= small["recall"] <= 1 and 0 <= large["recall"] <= 1
    # End to end: approximating every layer moves the perplexity away from exact attention.
    assert (runs["word_perplexity_delta"].abs() > 0).all()
    saved = pd.read_csv(out / "leaderboard.csv")
    assert list(saved["method"]) == list(table["method"])
    text = (out / "leaderboard.md").read_text()
    assert "| streaming" in text and "+0.000" in text  # the exact row's delta
    assert (out / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "runs" / "quest-6").glob("*/recall_table.md"))  # each run keeps its own reports


def test_use_cache_reads_finished_runs_back(board, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    table, out, model_args = board

    def never(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a finished run was evaluated again")

    monkeypatch.setattr(lm_eval, "simple_evaluate", never)
    again = run_leaderboard(
        model_args, ["streaming", "quest"], [2, 6, "30%"], ["retrieval_ppl_en"], str(out), metadata=TASK_METADATA,
        limit=2, use_cache=True,
    )
    pd.testing.assert_frame_equal(again, table)
    row = json.loads((out / "runs" / "streaming-2" / "row.json").read_text())
    assert row["method"] == "streaming" and row["budget"] == 2


def test_bad_methods_and_budgets_are_one_line_errors() -> None:
    with pytest.raises(UserInputError, match="approx='nope' is neither a built-in"):
        parse_methods("streaming,nope")
    with pytest.raises(UserInputError, match="--budgets must be a positive number of keys"):
        parse_budgets("0,32")
    with pytest.raises(UserInputError, match="a share is above 0% and at most 100%"):
        parse_budgets("32,150%")


def test_niah_columns_and_mixed_budgets_are_drawn_and_tabled(tmp_path: Path) -> None:
    """A NIAH board (needle_found, rouge1_recall) with budgets in keys and shares: the Markdown keeps each budget as
    written, and the figure gets its second panel (one position per budget, keys first, then shares)."""
    from lm_eval_retrieval.leaderboard import budget_order, leaderboard_figure, write_leaderboard

    rows = [{"method": "exact", "budget": None, "needle_found": 1.0, "rouge1_recall": 90.0}]
    for method, found in (("streaming", (0.2, 0.6, 0.4)), ("quest", (0.6, 1.0, 0.8))):
        for budget, value in zip((32, 128, "5%"), found):
            rows.append({"method": method, "budget": budget, "recall": value / 2, "scanned_pct": 10.0 * value,
                         "needle_found": value, "rouge1_recall": 80 * value})  # fmt: skip
    table = pd.DataFrame(rows)
    paths = write_leaderboard(table, tmp_path)
    text = (tmp_path / "leaderboard.md").read_text()
    cells = [[cell.strip() for cell in line.split("|")[1:3]] for line in text.splitlines()[2:]]
    assert ["quest", "5%"] in cells and ["quest", "128"] in cells and ["exact", "-"] in cells
    assert paths[-1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(["5%", 128.0, 32, None], key=budget_order) == [32, 128.0, "5%", None]
    figure = leaderboard_figure(table)
    right = figure.axes[1]
    assert [t.get_text() for t in right.get_xticklabels()] == ["32", "128", "5%"]
    assert list(right.lines[1].get_ydata()) == [0.6, 1.0, 0.8]  # quest, in budget order
