"""`h2o`: Heavy-Hitter Oracle, heavy hitters by accumulated attention plus a recent window, as a retriever.

Paper: Zhenyu Zhang, Ying Sheng, Tianyi Zhou, Tianlong Chen, Lianmin Zheng, Ruisi Cai, Zhao Song, Yuandong Tian,
Christopher Ré, Clark Barrett, Zhangyang Wang, Beidi Chen, "H2O: Heavy-Hitter Oracle for Efficient Generative
Inference of Large Language Models", 2023, arXiv:2306.14048.

Rule, per query q, batch row and query head: `recent` = its `topk - floor(topk * heavy_ratio)` most recent visible
keys (its own key included); `heavy` = the `floor(topk * heavy_ratio)` other visible keys with the largest
accumulated attention, the sum over every EARLIER query of the same sequence (same batch row, same query head) of
the exact softmax probability that query gave the key (softmax over all keys it could see, soft-capped where the
model soft-caps); ties go to the more recent key. The default `heavy_ratio=0.5` is the paper's half heavy, half
recent split of the budget, which scales with `topk`; a query that sees at most `topk` keys keeps them all.
Simplification: the paper evicts greedily, so its scores come from attention over the keys still retained; here
every query's accumulation uses its exact attention over all visible keys (the "oracle" accumulated-attention score
the paper's heavy-hitter analysis starts from). Each query's selection then depends on the sequence alone, not on
earlier approximations, which is what a per-query recall analysis needs. The accumulated scores live in
`approx_state(module)` across the chunks of a prefill and the decode steps, indexed by cache slot (re-indexed where
a sliding-window cache drops its oldest key), and start empty with each sequence.

On a CPU a numba kernel (`_h2o_scan.py`) walks each sequence's rows in order and keeps the sums in one vector, instead
of a cumulative sum over every (query, key) pair and a full sort of every row.

Cost model: scanned = the number of keys the query sees (H2O computes the query's full attention to accumulate it).
"""

from __future__ import annotations

from typing import Any

import torch

from ._cache_common import (
    PLACEHOLDER,
    absolute_to_cache,
    chunk_offset,
    pick,
    precise_dtype,
    visible_ranks,
)
from .._numba import numba_module
from .common import attend_valid, chunk_logits, masked_logits, module_softcap, shared_scores
from .contract import approx_args, approx_state, method, report_scanned


@method(heavy_ratio=0.5)
def h2o(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float,
    topk: int,
) -> tuple[torch.Tensor, None, torch.Tensor]:
    batch, q_heads, q_len, _ = query.shape
    k_len = key.shape[2]
    visible = attention_mask.expand(batch, -1, q_len, k_len)
    softcap = module_softcap(module)
    heavy = int(topk * float(approx_args(module, h2o)["heavy_ratio"]))
    kernels = numba_module("approx._h2o_scan") if query.device.type == "cpu" else None
    if kernels is not None:
        logits = chunk_logits(module, query, key, attention_mask, scaling, softcap)  # as wide as keys are seen
        state = approx_state(module)
        _, offset = chunk_offset(state, visible)
        offset = 0 if offset is None else offset
        acc = accumulated_so_far(state, batch, q_heads, k_len, offset, torch.zeros(0, dtype=torch.float64)).contiguous()
        k = min(topk, k_len)
        ids = torch.empty(batch, q_heads, q_len, k, dtype=torch.int64)
        valid = torch.empty(batch, q_heads, q_len, k, dtype=torch.bool)
        counts = torch.empty(batch, q_heads, q_len, dtype=torch.int64)
        kernels.h2o_select(
            logits.reshape(batch * q_heads, q_len, logits.shape[-1]).contiguous().numpy(),
            acc.view(batch * q_heads, k_len).numpy(), min(heavy, k), ids.view(-1, q_len, k).numpy(),
            valid.view(-1, q_len, k).numpy(), counts.view(-1, q_len).numpy(),
        )  # fmt: skip
        state["h2o_acc"] = (acc, offset)
        report_scanned(module, counts.float())
        return attend_valid(query, key, value, ids, valid, scaling, softcap, logits), None, ids
    logits = masked_logits(query, key, visible, scaling, softcap).to(precise_dtype(query))
    probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    state = approx_state(module)
    _, offset = chunk_offset(state, visible)
    before = accumulated_before(state, probs, 0 if offset is None else offset)
    count, from_end = visible_ranks(visible)
    recent = visible & (from_end <= topk - heavy)
    composite = torch.where(recent, float("inf"), torch.where(visible, before, PLACEHOLDER))
    ids, valid = pick(composite, min(topk, k_len))
    report_scanned(module, count.squeeze(-1).expand(batch, q_heads, q_len).float())
    scores = shared_scores(module, query)
    return attend_valid(query, key, value, ids, valid, scaling, softcap, scores), None, ids


def accumulated_before(state: dict[str, Any], probs: torch.Tensor, offset: int) -> torch.Tensor:
    """(B, Hq, Q, K) float64: each key's attention accumulated over the queries before each row of `probs`.

    The sequence's sums so far (state, from earlier chunks and steps) plus the rows above in this chunk (an
    exclusive cumulative sum); the state then takes this chunk's rows too.
    """
    batch, q_heads, q_len, k_len = probs.shape
    so_far = accumulated_so_far(state, batch, q_heads, k_len, offset, probs)
    rows_above = torch.cat([probs.new_zeros(batch, q_heads, 1, k_len), probs[:, :, :-1].cumsum(2)], dim=2)
    state["h2o_acc"] = (so_far + probs.sum(2), offset)
    return so_far.unsqueeze(2) + rows_above


def accumulated_so_far(
    state: dict[str, Any], batch: int, q_heads: int, k_len: int, offset: int, like: torch.Tensor
) -> torch.Tensor:
    """(B, Hq, K): the sequence's accumulated attention from earlier chunks and steps, re-indexed for this call's
    cache (zeros of `like`'s dtype and device at the start of a sequence, or after a batch of another shape)."""
    stored = state.get("h2o_acc")
    if stored is None or stored[0].shape[:2] != (batch, q_heads):
        return like.new_zeros(batch, q_heads, k_len)
    return absolute_to_cache(stored[0], stored[1], offset, k_len)
