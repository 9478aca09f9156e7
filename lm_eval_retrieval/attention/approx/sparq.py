"""`sparq`: keys scored with the query's largest components, exact attention over the best k, mean-value fill-in.

Paper: Luka Ribar, Ivan Chelombiev, Luke Hudlass-Galley, Charlie Blake, Carlo Luschi, Douglas Orr, "SparQ
Attention: Bandwidth-Efficient LLM Inference", 2023, arXiv:2312.04985.

Rule (the paper's Algorithm 1, per query). Take the r components of q with the largest magnitude (r = `rank`; the
default 0 means D/8, the paper's r/D = 1/8 setting) and score every visible key with those components only,
s_hat = softmax(q_r . k_r * scaling / sqrt(|q_r|_1 / |q|_1)): the paper's temperature sqrt(D |q_r|_1 / |q|_1) with
the model's own scaling in place of 1/sqrt(D), soft-capped before the softmax where the model soft-caps. The topk
keys by s_hat are kept (the budget is used as given: min(topk, visible) keys) and alpha = their s_hat mass. The
output is alpha * (exact attention over those keys) + (1 - alpha) * (mean of the visible values), the paper's
mean-value reallocation. With r = D the approximate scores are the exact ones, so the ids are exact top-k (the
output still differs from exact top-k attention by the mean-value term).

Cost model: scanned = (r / D) * visible_keys + picked_keys per query (the reduced scores, then the k exact ones).
"""

from __future__ import annotations

import torch

from ..topk import placeholder_ids, row_topk_lse
from .common import (
    attend_valid,
    module_softcap,
    scores_against,
    seen_width,
    shared_causal_first,
    shared_scores,
    soft_capped,
    weighted_values,
)
from .contract import approx_args, method, report_scanned
from .reduced import causal_reduced_topk, largest_components

NEG_INF = float("-inf")


@method(rank=0)
def sparq(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float,
    topk: int,
) -> tuple[torch.Tensor, None, torch.Tensor]:
    batch, q_heads, q_len, dim = query.shape
    k = min(topk, key.shape[2])
    # On a plainly causal chunk query i sees keys 0 .. first + i: no mask is read (see `shared_causal_first`).
    first = shared_causal_first(module, query)
    # Keys no query of this call sees (a causal chunk's later ones) are neither scored nor summed.
    if first is None:
        k_len = seen_width(attention_mask, at_least=k)
    else:
        k_len = min(key.shape[2], max(first + q_len, k))
    rank = sparq_rank(int(approx_args(module, sparq)["rank"]), dim)
    visible = attention_mask[..., :k_len].expand(batch, -1, q_len, k_len)
    softcap = module_softcap(module)
    # alpha: the approximate softmax mass of the k keys, exp(their scores - the row's log-normaliser), which the
    # top-k's kernel takes while each row is in cache (a row that sees nothing has no valid id: alpha 0).
    selected = None if first is None else _causal_select(query, key[:, :, :k_len], rank, scaling, softcap, k, first)
    if selected is None:
        approx = _approximate_logits(query, key[:, :, :k_len], rank, scaling, softcap)
        if first is None:  # (a plainly causal chunk's rows are read only up to their own key: no mask needed)
            approx.masked_fill_(~visible, NEG_INF)
        selected = row_topk_lse(approx, k, first)
    scores, ids, lse = selected
    ids, valid = placeholder_ids(scores, ids)
    alpha = torch.where(valid, (scores - lse.unsqueeze(-1)).exp(), 0.0).sum(-1, keepdim=True)
    picked = attend_valid(query, key, value, ids, valid, scaling, softcap, shared_scores(module, query))
    if first is None:
        seen = visible.sum(-1, keepdim=True).expand(batch, q_heads, q_len, 1)
    else:
        seen = torch.arange(first + 1, first + q_len + 1, device=query.device).view(q_len, 1)
        seen = seen.expand(batch, q_heads, -1, 1)
    mean_value = _visible_value_sum(visible, value[:, :, :k_len], q_heads, first) / seen.clamp(min=1)
    output = alpha * picked + (1.0 - alpha) * mean_value
    output = torch.where(seen > 0, output, 0.0)
    report_scanned(module, seen.squeeze(-1) * (rank / dim) + seen.squeeze(-1).clamp(max=k))
    return output, None, ids


def _visible_value_sum(
    visible: torch.Tensor, value: torch.Tensor, q_heads: int, causal_first: int | None = None
) -> torch.Tensor:
    """Sum of the values each query sees (B, Hq, Q, D) float32. On a plainly causal chunk (query i sees keys 0 ..
    causal_first + i) a running sum of the values (float64) read at each query's last key; else one matmul per KV
    head where the mask is shared by the heads, instead of one per query head over an expanded mask."""
    batch, kv_heads = value.shape[:2]
    if causal_first is not None:
        q_len = visible.shape[2]
        running = value[:, :, causal_first : causal_first + q_len].double().cumsum(2)
        if causal_first > 0:
            running += value[:, :, :causal_first].double().sum(2, keepdim=True)
        return running.float().repeat_interleave(q_heads // kv_heads, dim=1)
    if visible.shape[1] == 1:
        sums = torch.matmul(visible.float(), value.float())  # (B, Hkv, Q, D)
        return sums.repeat_interleave(q_heads // kv_heads, dim=1)
    return weighted_values(visible.float().expand(batch, q_heads, -1, -1).contiguous(), value)


def sparq_rank(rank: int, dim: int) -> int:
    """The rank used: `rank` if set (clamped to 1..D), else D/8."""
    return min(dim, max(1, rank if rank > 0 else dim // 8))


def _causal_select(
    query: torch.Tensor, key: torch.Tensor, rank: int, scaling: float, softcap: float | None, k: int, first: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`row_topk_lse` of the reduced scores of a plainly causal chunk (query i sees keys 0 .. first + i) from the
    rows of the transposed keys that the query's r largest components pick, without writing the scores
    (`reduced.causal_reduced_topk`); None where that does not apply."""
    weights_dims = largest_components(query, rank, scaling)
    if weights_dims is None:
        return None
    return causal_reduced_topk(*weights_dims, key.transpose(-1, -2), k, first, softcap, with_lse=True)


def _approximate_logits(
    query: torch.Tensor, key: torch.Tensor, rank: int, scaling: float, softcap: float | None
) -> torch.Tensor:
    """q_r . k_r * scaling / sqrt(|q_r|_1 / |q|_1) (B, Hq, Q, K), q_r = q with all but its r largest-magnitude
    components zeroed; soft-capped where the model soft-caps."""
    q = query.float()
    magnitude = q.abs()
    top = magnitude.topk(rank, dim=-1).indices
    kept = torch.zeros_like(q).scatter_(-1, top, q.gather(-1, top))
    share = kept.abs().sum(-1, keepdim=True) / magnitude.sum(-1, keepdim=True).clamp(min=1e-30)
    corrected = kept / share.clamp(min=1e-30).sqrt()
    return soft_capped(scores_against(corrected, key.float().transpose(-1, -2), scaling), softcap)
