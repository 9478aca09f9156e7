"""A retrieval budget as users state it: `topk=128` (keys per query) or `topk=5%` (of the keys each query sees).

A share is per query: a query that sees 2,000 keys at 5 % gets 100, one that sees 400 gets 20, so a long prompt's
early and late positions are held to the same proportion (the way KV-cache papers state budgets). Recall@k is then
taken against each query's own exact top-k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import UserInputError


@dataclass(frozen=True)
class Budget:
    """Either `tokens` keys per query, or `percent` of each query's visible keys (never both)."""

    tokens: int = 0
    percent: float = 0.0

    @property
    def is_share(self) -> bool:
        return self.percent > 0

    def keys(self, visible: int) -> int:
        """k for a query that sees `visible` keys (at least 1, at most `visible` where that is known)."""
        if not self.is_share:
            return self.tokens
        return max(1, math.ceil(self.percent * visible / 100 - 1e-9))

    def default_min_visible_keys(self) -> int:
        """Queries with fewer visible keys are not counted: 10 k for a token budget (so k is at most a tenth of
        the keys); for a share, the visible keys at which it reaches 10 keys."""
        if not self.is_share:
            return 10 * self.tokens
        return math.ceil(1000 / self.percent - 1e-9)

    def label(self) -> str:
        """As the user wrote it: `128` or `5%` (what the results JSON's `topk` holds)."""
        return f"{self.percent:g}%" if self.is_share else str(self.tokens)

    def json_value(self) -> int | str:
        return self.label() if self.is_share else self.tokens

    def __str__(self) -> str:
        return self.label()


def parse_budget(value: Any, what: str = "topk") -> Budget:
    """`128`, "128" -> 128 keys; "5%" -> 5 % of each query's visible keys; anything else is a one-line error."""
    if isinstance(value, Budget):
        return value
    text = str(value).strip()
    hint = f"{what} must be a positive number of keys (e.g. {what}=128) or a share of the visible keys (e.g. {what}=5%)"
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            raise UserInputError(f"{hint}, got {value!r}") from None
        if not 0 < percent <= 100 or not math.isfinite(percent):
            raise UserInputError(f"{hint}; a share is above 0% and at most 100%, got {value!r}")
        return Budget(percent=percent)
    try:
        tokens = int(text)
    except ValueError:
        raise UserInputError(f"{hint}, got {value!r}") from None
    if tokens <= 0 or isinstance(value, float) and value != tokens:
        raise UserInputError(f"{hint}, got {value!r}")
    return Budget(tokens=tokens)
