"""`streaming`: StreamingLLM's cache, attention sinks plus a recent window, as a retriever.

Paper: Guangxuan Xiao, Yuandong Tian, Beidi Chen, Song Han, Mike Lewis, "Efficient Streaming Language Models with
Attention Sinks", 2023, arXiv:2309.17453.

Rule: each query attends to the first `sinks` keys it can see (the attention sinks: the first VISIBLE keys, so a
left-padded row's sinks are its first real tokens and a sliding-window layer's sinks are the first keys inside its
window) and to the most recent `topk - sinks` visible keys (its own key included); nothing else. The budget is
split as the paper does (4 sinks, the rest a rolling window); where the budget is small the sinks shrink to
`min(sinks, topk - 1)` so that at least the query's own key stays in the window. A query that sees at most `topk`
keys keeps them all. The paper also re-numbers positions inside its rolling cache; the keys here were rotated by
the model already, so they keep their original positions (the selection is what is measured).

Cost model: scanned = 0 per query (the keys are chosen from their positions alone, no key vector is read).
"""

from __future__ import annotations

import torch

from .._numba import numba_module
from ._cache_common import EXCLUDED, PLACEHOLDER, pick, visible_ranks
from .common import attend_valid, module_softcap, shared_scores
from .contract import approx_args, method, report_scanned


@method(sinks=4)
def streaming(
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
    ids, valid = streaming_ids(visible, int(approx_args(module, streaming)["sinks"]), topk)
    shape = (batch, q_heads, q_len, ids.shape[-1])
    ids, valid = ids.expand(shape).contiguous(), valid.expand(shape)
    report_scanned(module, 0.0)
    softcap = module_softcap(module)
    return attend_valid(query, key, value, ids, valid, scaling, softcap, shared_scores(module, query)), None, ids


def streaming_ids(visible: torch.Tensor, sinks: int, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, valid) (B, H, Q, min(topk, K)) of each row's kept keys, most recent first, then filler (as `pick`
    orders them). On a CPU one numba walk per row from each end (`_attend_scan.streaming_rows`) instead of ranking
    every key."""
    width = min(topk, visible.shape[-1])
    kernels = numba_module("approx._attend_scan") if visible.device.type == "cpu" else None
    if kernels is None or width == 0:
        kept = streaming_keys(visible, sinks, topk)
        return pick(torch.where(kept, 1.0, torch.where(visible, EXCLUDED, PLACEHOLDER)), width)
    rows = visible.reshape(-1, visible.shape[-1]).contiguous()
    ids = torch.empty(rows.shape[0], width, dtype=torch.int64)
    valid = torch.empty(rows.shape[0], width, dtype=torch.bool)
    sinks = max(0, min(sinks, topk - 1))
    kernels.streaming_rows(rows.numpy(), sinks, topk - sinks, ids.numpy(), valid.numpy())
    shape = (*visible.shape[:-1], width)
    return ids.view(shape), valid.view(shape)


def streaming_keys(visible: torch.Tensor, sinks: int, topk: int) -> torch.Tensor:
    """Bool like `visible`: its first `sinks` and last `topk - sinks` visible keys per query (see the docstring)."""
    sinks = max(0, min(sinks, topk - 1))
    count, from_end = visible_ranks(visible)
    from_start = count - from_end + 1
    return visible & ((from_start <= sinks) | (from_end <= topk - sinks))
