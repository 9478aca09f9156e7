"""Retrieval-head-aware approximation runs: group statistics for a head-score file's top heads, and hybrids that keep
some heads on exact attention (`exact_heads=`, `exact_heads_random=`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.models.ret_approx import RetApproxLM
from lm_eval_retrieval.report.recall import format_recall_table
from test_ret_approx import _plain_rolling, _requests

# Tiny Llama: 2 layers x 4 heads. Scores rank 1-2 first, then 0-3, 1-0, ...
SCORES = {"0-0": [0.1], "0-1": [0.2], "0-2": [0.05], "0-3": [0.8], "1-0": [0.7], "1-1": [0.3], "1-2": [0.9], "1-3": [0.0]}


@pytest.fixture(scope="module")
def head_scores(tmp_path_factory) -> str:  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("scores") / "tiny.json"
    path.write_text(json.dumps(SCORES))
    return str(path)


def _lm(tiny_model_dir: str, tmp_path: Path, **kwargs) -> RetApproxLM:  # type: ignore[no-untyped-def]
    options = dict(topk=2, min_visible_keys=4, approx="streaming", layerwise_topk_analysis="False")
    options.update(kwargs)
    return RetApproxLM(pretrained=tiny_model_dir, output_path=str(tmp_path), dtype="float32", **options)


def test_all_heads_exact_is_the_plain_model(tiny_model_dir: str, tmp_path: Path, head_scores: str) -> None:
    lm = _lm(tiny_model_dir, tmp_path, head_scores=head_scores, exact_heads=8)
    plain = _plain_rolling(lm)
    assert lm.loglikelihood_rolling(_requests()) == pytest.approx(plain, abs=1e-4)
    stats = lm.probe.stats
    torch.testing.assert_close(stats.means("recall"), torch.ones_like(stats.means("recall")))
    torch.testing.assert_close(stats.means("scanned"), torch.ones_like(stats.means("scanned")))


def test_no_exact_heads_is_the_uniform_run(tiny_model_dir: str, tmp_path: Path, head_scores: str) -> None:
    hybrid = _lm(tiny_model_dir, tmp_path / "a", head_scores=head_scores, exact_heads=0)
    uniform = _lm(tiny_model_dir, tmp_path / "b")
    assert hybrid.loglikelihood_rolling(_requests()) == uniform.loglikelihood_rolling(_requests())
    assert hybrid.loglikelihood_rolling(_requests()) != pytest.approx(_plain_rolling(uniform), abs=1e-4)


def test_top_heads_exact_and_their_random_control(tiny_model_dir: str, tmp_path: Path, head_scores: str) -> None:
    top = _lm(tiny_model_dir, tmp_path / "top", head_scores=head_scores, exact_heads=2)
    assert top.exact_heads == [(1, 2), (0, 3)]
    control = _lm(tiny_model_dir, tmp_path / "random", head_scores=head_scores, exact_heads_random=2, seed=1)
    assert len(control.exact_heads) == 2 and not set(control.exact_heads) & {(1, 2), (0, 3)}
    top.loglikelihood_rolling(_requests())
    recall = top.probe.stats.means("recall")
    assert recall[1, 2] == 1 and recall[0, 3] == 1 and recall[0, 0] < 1  # exact heads count as exact
    info = top.recall_stats()
    assert info["exact_heads"] == {"kind": "exact_heads", "heads": ["1-2", "0-3"]}


def test_retrieval_heads_against_the_rest(tiny_model_dir: str, tmp_path: Path, head_scores: str) -> None:
    lm = _lm(tiny_model_dir, tmp_path, head_scores=head_scores, retrieval_top=3, layerwise_topk_analysis="True")
    lm.loglikelihood_rolling(_requests())
    stats = lm.probe.stats
    groups = lm.recall_stats()["retrieval_heads"]
    assert groups["heads"] == ["1-2", "0-3", "1-0"] and groups["top"] == 3
    chosen = torch.zeros(2, 4, dtype=torch.bool)
    chosen[1, 2] = chosen[0, 3] = chosen[1, 0] = True
    for name in ("recall", "error_norm"):
        for key, where in (("retrieval", chosen), ("others", ~chosen)):
            expected = float(stats.sums[name][where].sum() / stats.queries[where].sum())
            assert groups[key][name] == pytest.approx(expected)
    lm.write_reports()
    table = (Path(lm.report_dir) / "recall_table.md").read_text()
    assert "Top-3 retrieval heads of" in table and "all other heads" in table
    assert format_recall_table(lm.recall_stats()).count("Top-3 retrieval heads") == 1


def test_exact_heads_needs_a_head_score_file(tiny_model_dir: str, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="exact_heads needs head_scores="):
        _lm(tiny_model_dir, tmp_path, exact_heads=2)


def test_the_leaderboard_reports_the_retrieval_heads_against_the_rest(
    tiny_model_dir: str, tmp_path: Path, head_scores: str
) -> None:
    from lm_eval_retrieval.leaderboard import run_leaderboard

    model_args = {"pretrained": tiny_model_dir, "dtype": "float32", "head_scores": head_scores, "retrieval_top": 3}
    table = run_leaderboard(
        model_args, ["streaming"], [2], ["retrieval_ppl_en"], str(tmp_path), metadata={"doc_sentences": 12}, limit=1
    )
    row = table[table["method"] == "streaming"].iloc[0]
    stats = json.loads(next((tmp_path / "runs" / "streaming-2").glob("*/recall_stats.json")).read_text())
    groups = stats["retrieval_heads"]
    assert row["retrieval_heads_recall"] == pytest.approx(groups["retrieval"]["recall"])
    assert row["other_heads_recall"] == pytest.approx(groups["others"]["recall"])
    assert "retrieval_heads_recall" in (tmp_path / "leaderboard.md").read_text()
