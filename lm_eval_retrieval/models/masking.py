"""Which heads to mask, from the model args: an explicit list, the top K of a head-score file, or K random others."""

from __future__ import annotations

import random
import re
from typing import Any

from ..errors import UserInputError
from ..report.heads import head_shape, load_head_scores, rank_heads

HEAD = re.compile(r"^\s*(\d+)-(\d+)\s*$")


def parse_head_list(text: str, shape: tuple[int, int]) -> list[tuple[int, int]]:
    """'16-19;11-15' (as model_args write it; ',' or spaces work too) -> [(16, 19), (11, 15)], checked against shape."""
    heads = []
    for part in re.split(r"[,;\s]+", str(text).strip()):
        if not part:
            continue
        match = HEAD.match(part)
        if not match:
            raise UserInputError(f"mask_heads: {part!r} is not <layer>-<head> (e.g. mask_heads=16-19;11-15)")
        layer, head = int(match.group(1)), int(match.group(2))
        if layer >= shape[0] or head >= shape[1]:
            raise UserInputError(
                f"mask_heads: head {layer}-{head} is out of range for a model of {shape[0]} layers x {shape[1]} heads; "
                f"use layers 0-{shape[0] - 1} and heads 0-{shape[1] - 1}"
            )
        heads.append((layer, head))
    return heads


def _scores_for(path: str, shape: tuple[int, int]) -> list[tuple[int, int, float]]:
    scores = load_head_scores(path)
    file_shape = head_shape(scores)
    if file_shape != shape:
        raise UserInputError(
            f"head_scores={path} is for a model of {file_shape[0]} layers x {file_shape[1]} heads, this model has "
            f"{shape[0]} x {shape[1]}: use a head-score file of this model"
        )
    return rank_heads(scores)


def select_heads(
    shape: tuple[int, int],
    mask_heads: Any = None,
    mask_topk: Any = None,
    mask_random: Any = None,
    head_scores: str | None = None,
    seed: Any = 0,
) -> list[tuple[int, int]]:
    """The heads to mask; exactly one of mask_heads / mask_topk / mask_random may be given."""
    given = [name for name, value in (("mask_heads", mask_heads), ("mask_topk", mask_topk), ("mask_random", mask_random))
             if value not in (None, "")]
    if len(given) > 1:
        raise UserInputError(f"give one of mask_heads, mask_topk, mask_random, not {' and '.join(given)}")
    if not given:
        return []
    if given[0] == "mask_heads":
        return parse_head_list(mask_heads, shape)
    k = _count(mask_topk if given[0] == "mask_topk" else mask_random, given[0], shape)
    if not head_scores:
        raise UserInputError(f"{given[0]} needs head_scores=<head_score/model.json> to rank the heads")
    ranked = [(layer, head) for layer, head, _ in _scores_for(head_scores, shape)]
    if given[0] == "mask_topk":
        return ranked[:k]
    others = sorted(ranked[k:])
    if k > len(others):
        raise UserInputError(f"mask_random={k}: only {len(others)} heads lie outside the top {k}; use a smaller K")
    return sorted(random.Random(int(seed)).sample(others, k))


def _count(value: Any, name: str, shape: tuple[int, int]) -> int:
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise UserInputError(f"{name} must be a number of heads, got {value!r}")
    total = shape[0] * shape[1]
    if not 0 <= k <= total:
        raise UserInputError(f"{name}={k} but the model has {total} heads ({shape[0]} layers x {shape[1]}); use 0..{total}")
    return k


def by_layer(heads: list[tuple[int, int]]) -> dict[int, list[int]]:
    layers: dict[int, list[int]] = {}
    for layer, head in heads:
        layers.setdefault(layer, []).append(head)
    return layers
