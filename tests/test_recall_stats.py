"""The recall statistics as a typed value: checked once where they enter, then handed to the table and the plots."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.report import recall_stats as recall_stats_module
from lm_eval_retrieval.report.plots import head_grid, write_recall_plots
from lm_eval_retrieval.report.recall import load_recall_stats, validate_recall_stats, write_recall_reports
from lm_eval_retrieval.report.recall_stats import RecallStats, as_recall_stats

from test_report_recall import make_stats


@pytest.fixture
def count_checks(monkeypatch):
    """How many times a statistics dict is validated."""
    calls = []
    original = recall_stats_module._validate

    def counting(stats, where):
        calls.append(where)
        return original(stats, where)

    monkeypatch.setattr(recall_stats_module, "_validate", counting)
    return calls


def test_from_dict_builds_a_frozen_typed_value():
    stats = RecallStats.from_dict(make_stats())
    assert stats.model == "smollm2-135m" and stats.topk == 10 and stats.layerwise_topk_analysis is True
    assert [layer.module for layer in stats.layers] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert stats.layers[1].recall == (0.75, 0.25, None) and stats.layers[1].queries == (80, 80, 0)
    assert stats.total_queries == 520 and stats.max_heads == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.topk = 5  # type: ignore[misc]
    assert as_recall_stats(stats) is stats


def test_to_dict_is_the_file_format_and_round_trips():
    stats = RecallStats.from_dict(make_stats())
    assert stats.to_dict() == validate_recall_stats(make_stats())
    assert RecallStats.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats
    assert validate_recall_stats(stats) == stats.to_dict()


def test_unknown_keys_are_kept_for_the_round_trip():
    stats = RecallStats.from_dict(make_stats(note="run on a laptop"))
    assert stats.to_dict()["note"] == "run on a laptop"


def test_a_bad_value_is_a_one_line_error_naming_where_it_came_from():
    raw = make_stats()
    raw["layers"][0]["recall"][0] = "high"
    with pytest.raises(UserInputError) as info:
        RecallStats.from_dict(raw, "ret-approx-hf statistics")
    message = str(info.value)
    assert "\n" not in message and message.startswith("ret-approx-hf statistics:") and "recall[0]" in message


def test_writing_the_reports_checks_a_dict_once(tmp_path, count_checks):
    write_recall_reports(make_stats(), tmp_path / "a")
    assert len(count_checks) == 1  # the table, the JSON and four plots share the one check


def test_a_typed_value_is_not_checked_again(tmp_path, count_checks):
    stats = RecallStats.from_dict(make_stats())
    count_checks.clear()
    write_recall_reports(stats, tmp_path / "a")
    write_recall_plots(stats, tmp_path / "b")
    head_grid(stats, "recall")
    assert count_checks == []


def test_a_file_is_checked_once_on_the_way_in(tmp_path, count_checks):
    write_recall_reports(make_stats(), tmp_path / "run")
    count_checks.clear()
    loaded = load_recall_stats(tmp_path / "run")
    assert isinstance(loaded, RecallStats) and len(count_checks) == 1
    write_recall_plots(loaded, tmp_path / "plots")
    assert len(count_checks) == 1
