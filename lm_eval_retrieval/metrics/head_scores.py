"""The head scores `retrieval-head-hf` can compute in one detection pass, and the checks of the args that pick them.

`copy` is Wu et al.'s retrieval score (metrics/retrieval_score.py); `mass`, `qr` and `distant` are HeadKV's,
QRHead's and a DuoAttention-style score (metrics/head_score_mass.py, head_score_qr.py, head_score_distant.py, each
with its source). Each is written to its own head-score file in the copy score's format.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserInputError
from . import head_score_distant, head_score_mass, head_score_qr

SCORES = ("copy", "mass", "qr", "distant")
DEFAULT_SCORES = ("copy",)

#: Which documents count toward each score, as its paper decides (recorded in the results JSON).
GATES = {
    "copy": "ROUGE-1 recall > 50 against the answer (Wu et al. 2024)",
    "mass": head_score_mass.GATE_TEXT,
    "qr": head_score_qr.GATE_TEXT,
    "distant": head_score_distant.GATE_TEXT,
}
PAPERS = {
    "copy": "Wu et al. 2024, Retrieval Head Mechanistically Explains Long-Context Factuality (arXiv 2404.15574)",
    "mass": "Fu et al. 2024, Not All Heads Matter (HeadKV, arXiv 2410.19258)",
    "qr": "Wu et al. 2025, Query-Focused Retrieval Heads (QRHead, arXiv 2506.09944)",
    "distant": "Xiao et al. 2024, DuoAttention (arXiv 2410.10819)",
}


def parse_scores(value: Any) -> tuple[str, ...]:
    """`copy;mass;qr;distant` (semicolons: lm-eval splits model_args at commas) -> the names, in SCORES order."""
    if isinstance(value, (list, tuple)):
        names = [str(v).strip() for v in value]
    else:
        names = [part.strip() for part in str(value).replace(",", ";").split(";")]
    names = [name for name in names if name]
    unknown = [name for name in names if name not in SCORES]
    if unknown or not names:
        shown = ", ".join(map(repr, unknown)) if unknown else repr(value)
        raise UserInputError(f"unknown scores={shown}; use one or more of {';'.join(SCORES)}, separated by ';'")
    return tuple(name for name in SCORES if name in names)


def window_size(name: str, value: Any, minimum: int = 0) -> int:
    """A sink or recent-window size in tokens, checked: a whole number >= `minimum`."""
    try:
        if isinstance(value, bool):
            raise ValueError
        size = int(value)
        if isinstance(value, float) and value != size:
            raise ValueError
    except (TypeError, ValueError):
        raise UserInputError(f"{name} must be a whole number of tokens, got {value!r}") from None
    if size < minimum:
        raise UserInputError(f"{name} must be >= {minimum}, got {size}")
    return size
