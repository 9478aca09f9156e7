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
        model_args, ["streaming", "quest"], [2, 6], ["retrieval_ppl_en"], str(out), metadata=TASK_METADATA, limit=2
    )
    return table, out, model_args


def test_one_row_per_run_with_quality_cost_and_task_metric(board) -> None:  # type: ignore[no-untyped-def]
    table, out, _ = board
    assert list(zip(table["method"], table["budget"].fillna(0).astype(int))) == [
        ("exact", 0), ("streaming", 2), ("streaming", 6), ("quest", 2), ("quest", 6),
    ]  # fmt: skip
    exact = table[table["method"] == "exact"].iloc[0]
    assert exact["word_perplexity_delta"] == 0 and pd.isna(exact["recall"])
    runs = table[table["method"] != "exact"].set_index(["method", "budget"])
    assert runs["queries"].nunique() == 1 and runs["queries"].iloc[0] > 0  # every budget counts the same queries
    assert (runs["scanned_pct"].loc["streaming"] == 0).all()  # positions only
    assert (runs["scanned_pct"].loc["quest"] > 0).all()
    for method in ("streaming", "quest"):  # a larger budget attends more keys and recalls more of the exact top-k
        small, large = runs.loc[(method, 2)], runs.loc[(method, 6)]
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
        model_args, ["streaming", "quest"], [2, 6], ["retrieval_ppl_en"], str(out), metadata=TASK_METADATA, limit=2,
        use_cache=True,
    )
    pd.testing.assert_frame_equal(again, table)
    row = json.loads((out / "runs" / "streaming-2" / "row.json").read_text())
    assert row["method"] == "streaming" and row["budget"] == 2


def test_bad_methods_and_budgets_are_one_line_errors() -> None:
    with pytest.raises(UserInputError, match="approx='nope' is neither a built-in"):
        parse_methods("streaming,nope")
    with pytest.raises(UserInputError, match="--budgets must be positive"):
        parse_budgets("0,32")
    with pytest.raises(UserInputError, match="--budgets must be comma-separated numbers"):
        parse_budgets("5%")
