"""Budgets as users state them: keys per query, or a share of each query's visible keys."""

from __future__ import annotations

import pytest

from lm_eval_retrieval.attention.budget import Budget, parse_budget
from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.leaderboard import parse_budgets, shared_min_visible_keys


def test_keys_and_shares() -> None:
    assert parse_budget(128) == parse_budget("128") == Budget(tokens=128)
    five = parse_budget("5%")
    assert five.is_share and five.label() == "5%" and five.json_value() == "5%"
    assert [five.keys(v) for v in (1, 19, 20, 21, 400, 401)] == [1, 1, 1, 2, 20, 21]  # ceil, at least one key
    assert parse_budget("12.5%").keys(8) == 1 and parse_budget("100%").keys(37) == 37
    assert Budget(tokens=32).default_min_visible_keys() == 320
    assert five.default_min_visible_keys() == 200  # where 5% reaches 10 keys


@pytest.mark.parametrize("bad", ["0", "-3", "abc", "5.5", "0%", "101%", "x%", ""])
def test_bad_budgets_are_one_line_errors(bad: str) -> None:
    with pytest.raises(UserInputError, match=r"topk must be a positive number of keys .* or a share"):
        parse_budget(bad)


def test_leaderboard_budgets_keys_first_then_shares() -> None:
    budgets = parse_budgets("5%,128,32,1%,32")
    assert [b.label() for b in budgets] == ["32", "128", "1%", "5%"]
    assert shared_min_visible_keys(budgets) == 320  # the smallest budget in keys sets the query population
    assert shared_min_visible_keys(parse_budgets("5%,10%")) == 200
    with pytest.raises(UserInputError, match="--budgets"):
        parse_budgets("32,zero")
