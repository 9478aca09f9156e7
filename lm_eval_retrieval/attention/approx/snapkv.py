"""`snapkv`: SnapKV, prompt keys voted for by an observation window at the end of the prompt, as a retriever.

Paper: Yuhong Li, Yingbing Huang, Bowen Yang, Bharat Venkitesh, Acyr Locatelli, Hanchen Ye, Tianle Cai, Patrick
Lewis, Deming Chen, "SnapKV: LLM Knows What You are Looking for Before Generation", 2024, arXiv:2404.14469.

Rule. A prompt that ends at position p is compressed once: its observation window is its last w queries (and their
keys, the w most recent visible keys); each prefix key (visible to p, not in the window) gets as votes the softmax
attention the window's queries give it (exact softmax over all keys each window query sees, soft-capped where the
model soft-caps), summed over the window; the votes are pooled along the keys by a 1-D `pooling` ("max" or "avg",
stride 1, zero padding counted as the paper's code does) of width `kernel`; the `topk - w` prefix keys with the
largest pooled votes (ties to the more recent key) are kept, plus the window's w keys. Budget: w = min(`window`,
max(1, topk // 2), keys p sees), so the paper's window (32, with kernel 7 and max pooling, its LongBench setting)
applies once topk >= 64 and at least half of a small budget goes to voted keys; a query seeing at most topk keys
keeps them all. Prefill queries: SnapKV itself attends exactly during the prefill and compresses at its end, which
would make every prompt query exact; here a prompt query at p attends to the keys SnapKV would keep if the prompt
ended at p (a sliding observation window), since every prefix of a prompt is a prompt in its own right (the
continuation tokens lm-eval scores are prompt positions). Decode steps (queries of later forward passes) attend, as
in the paper, to the selection made at the end of the prompt plus every key generated since (always kept, so a
decode step may attend more than topk keys). The window's last attention rows and that final selection live in
`approx_state(module)` (empty at each new sequence), so chunked prefills, decode steps and sliding-window caches
(which drop their oldest keys) all see the same rule.

Cost model: scanned = the keys a prompt query sees (its exact attention row is computed once and feeds the votes of
every window that contains it), 0 for a decode step (the selection is reused, no key is scored to choose).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...errors import UserInputError
from ._cache_common import (
    EXCLUDED,
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


@method(window=32, kernel=7, pooling="max")
def snapkv(
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
    args = approx_args(module, snapkv)
    state = approx_state(module)
    start, offset = chunk_offset(state, visible)
    offset = 0 if offset is None else offset
    softcap = module_softcap(module)
    if "snapkv_selection" in state:
        ids, valid = decode_ids(state, visible.expand(batch, q_heads, -1, -1), start, offset)
        report_scanned(module, 0.0)
    else:
        kernels = numba_module("approx._snapkv_scan") if query.device.type == "cpu" else None
        if kernels is not None:
            logits = chunk_logits(module, query, key, attention_mask, scaling, softcap)  # as wide as keys are seen
            ids, valid, counts = prompt_ids_kernel(kernels, state, logits, k_len, visible, topk, args, start, offset)
        else:
            ids, valid = prompt_ids(state, query, key, visible, scaling, softcap, topk, args, start, offset)
            counts = visible.sum(-1).expand(batch, q_heads, q_len)
        report_scanned(module, counts.float())
    return attend_valid(query, key, value, ids, valid, scaling, softcap, shared_scores(module, query)), None, ids


def window_size(args: dict[str, Any], topk: int) -> int:
    """The observation window for a budget of topk keys (before it is cut to the keys a query sees)."""
    return max(1, min(int(args["window"]), max(1, topk // 2)))


def prompt_ids(
    state: dict[str, Any],
    query: torch.Tensor,
    key: torch.Tensor,
    visible: torch.Tensor,
    scaling: float,
    softcap: float | None,
    topk: int,
    args: dict[str, Any],
    start: int,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids for prompt queries (the sliding observation window, see the module docstring); remembers the last rows
    for the next chunk and, where this chunk ends the prompt, the selection for the decode steps."""
    batch, q_heads, q_len, _ = query.shape
    k_len = key.shape[2]
    logits = masked_logits(query, key, visible, scaling, softcap).to(precise_dtype(query))
    probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    earlier = earlier_rows(state, batch, q_heads, offset, k_len, probs)
    rows = torch.cat([earlier, probs], dim=2)  # the chunk's rows preceded by the prompt rows just before them
    sums = torch.cat([rows.new_zeros(batch, q_heads, 1, k_len), rows.cumsum(2)], dim=2)
    count, from_end = visible_ranks(visible)
    available = torch.arange(1, q_len + 1, device=query.device).view(1, 1, q_len, 1) + earlier.shape[2]
    width = count.clamp(max=window_size(args, topk)).minimum(available)  # (B, 1|Hq, Q, 1)
    top = available.expand_as(width)
    gather = lambda row: sums.gather(2, row.expand(batch, q_heads, q_len, 1).expand(-1, -1, -1, k_len))  # noqa: E731
    votes = (gather(top) - gather(top - width)).clamp_(min=0.0)  # a sum of probabilities, whatever the rounding
    in_window = visible & (from_end <= width)
    prefix = visible & ~in_window
    pooled = pool(torch.where(prefix, votes, 0.0), int(args["kernel"]), str(args["pooling"]))
    composite = torch.where(in_window, float("inf"), torch.where(prefix, pooled, PLACEHOLDER))
    ids, valid = pick(composite, min(topk, k_len))
    keep = window_size(args, topk) - 1
    remember_prompt(state, rows[:, :, max(0, rows.shape[2] - keep) :] if keep else rows[:, :, :0], offset, ids, valid,
                    visible, start + q_len)  # fmt: skip
    return ids, valid


def prompt_ids_kernel(
    kernels: Any,
    state: dict[str, Any],
    logits: torch.Tensor,
    k_len: int,
    visible: torch.Tensor,
    topk: int,
    args: dict[str, Any],
    start: int,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`prompt_ids` by the CPU kernel (`_snapkv_scan.py`) from the chunk's masked logits (B, Hq, Q, W <= K): the same
    rule, one walk down each sequence's rows; also each row's visible key count (B, Hq, Q)."""
    batch, q_heads, q_len, width = logits.shape
    kernel = int(args["kernel"])
    check_pooling(kernel, str(args["pooling"]))
    earlier = earlier_rows(state, batch, q_heads, offset, k_len, torch.zeros(0, dtype=torch.float64))
    window = window_size(args, topk)
    kept = min(window - 1, earlier.shape[2] + q_len)
    k = min(topk, k_len)
    ids = torch.empty(batch, q_heads, q_len, k, dtype=torch.int64)
    valid = torch.empty(batch, q_heads, q_len, k, dtype=torch.bool)
    counts = torch.empty(batch, q_heads, q_len, dtype=torch.int64)
    tail = torch.empty(batch, q_heads, kept, width, dtype=torch.float64)
    groups = batch * q_heads
    kernels.snapkv_prompt(
        logits.reshape(groups, q_len, width).contiguous().numpy(),
        earlier.reshape(groups, earlier.shape[2], k_len).contiguous().numpy(), window,
        kernel, str(args["pooling"]) == "avg", ids.view(groups, q_len, k).numpy(),
        valid.view(groups, q_len, k).numpy(), counts.view(groups, q_len).numpy(),
        tail.view(groups, kept, width).numpy(),
    )  # fmt: skip
    remember_prompt(state, F.pad(tail, (0, k_len - width)), offset, ids, valid, visible, start + q_len)
    return ids, valid, counts


def remember_prompt(
    state: dict[str, Any],
    rows: torch.Tensor,
    offset: int,
    ids: torch.Tensor,
    valid: torch.Tensor,
    visible: torch.Tensor,
    end: int,
) -> None:
    """Keep the chunk's last softmax rows for the next chunk's windows or, where the chunk ends the prompt (its last
    row sees the last key), the selection the decode steps reuse."""
    state["snapkv_rows"] = (rows, offset)
    if bool((visible[..., -1, -1]).any()):
        state["snapkv_selection"] = (ids[:, :, -1], valid[:, :, -1], offset)
        state["snapkv_prompt_end"] = end
        state.pop("snapkv_rows")


def earlier_rows(
    state: dict[str, Any], batch: int, q_heads: int, offset: int, k_len: int, like: torch.Tensor
) -> torch.Tensor:
    """The attention rows (B, Hq, T, K) of the prompt queries just before this chunk, kept by the last chunk."""
    stored = state.get("snapkv_rows")
    if stored is None or stored[0].shape[:2] != (batch, q_heads):
        return like.new_zeros(batch, q_heads, 0, k_len)
    return absolute_to_cache(stored[0], stored[1], offset, k_len)


def pool(votes: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """1-D pooling of the votes along the keys (stride 1, the key count unchanged)."""
    check_pooling(kernel, pooling)
    flat = votes.reshape(-1, 1, votes.shape[-1])
    if pooling == "max":
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    return pooled[..., : votes.shape[-1]].reshape(votes.shape)


def check_pooling(kernel: int, pooling: str) -> None:
    """One-line errors for pooling parameters no rule can apply."""
    if kernel < 1:
        raise UserInputError(f"approx=snapkv parameter kernel must be >= 1, got {kernel}")
    if pooling not in ("max", "avg"):
        raise UserInputError(f"approx=snapkv parameter pooling must be max or avg, got {pooling!r}")


def decode_ids(
    state: dict[str, Any], visible: torch.Tensor, start: int, offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids for queries after the prompt: the prompt's final selection plus every key generated since."""
    selection, selection_valid, selection_offset = state["snapkv_selection"]
    prompt_end = state["snapkv_prompt_end"]
    batch, q_heads, q_len, k_len = visible.shape
    slots = selection + selection_offset - offset  # the selected keys' slots in this call's cache
    in_cache = selection_valid & (slots >= 0) & (slots < k_len)
    selected = torch.zeros(batch, q_heads, k_len + 1, dtype=torch.bool, device=visible.device)
    selected.scatter_(-1, torch.where(in_cache, slots, k_len), True)  # slot k_len: a bin for what is gone
    generated = torch.arange(k_len, device=visible.device) + offset >= prompt_end
    chosen = visible & (selected[..., None, :k_len] | generated)
    composite = torch.where(chosen, 1.0, torch.where(visible, EXCLUDED, PLACEHOLDER))
    width = min(k_len, selection.shape[-1] + (start + q_len - prompt_end))
    return pick(composite, width)
