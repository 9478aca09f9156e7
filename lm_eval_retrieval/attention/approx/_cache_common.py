"""Helpers shared by the KV-cache eviction methods (`streaming`, `h2o`, `snapkv`): ranking keys into ids and locating
a query chunk in its sequence (their attention over the chosen ids is `common.attend_valid`).

Eviction methods choose a *set* of keys, and two cases do not fit `common.attend_over_picked`: a set may be smaller
than the id tensor is wide (fewer keys chosen than k in one row of the batch) while every key of that row is visible
(a sliding-window cache), so a placeholder cannot always be an invisible key. The ids here therefore come with a
`valid` flag: only valid ids get weight, and a placeholder is an invisible key where one exists, else a repeat of
the row's first id (the probe counts a repeated id once).
"""

from __future__ import annotations

from typing import Any

import torch

from .._numba import numba_module

PLACEHOLDER = -1.0  # rank of an invisible key: fills the ids of a row that chose fewer than k keys
EXCLUDED = -2.0  # rank of a visible key the method did not choose: used only where no invisible key is left


def precise_dtype(like: torch.Tensor) -> torch.dtype:
    """float64 for sums of probabilities (ranks must not flip on rounding), float32 where float64 is missing (MPS)."""
    return torch.float32 if like.device.type == "mps" else torch.float64


def pick(composite: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k keys of largest `composite` (B, H, Q, K), ties to the more recent key -> (ids, valid) (B, H, Q, k).

    `composite` >= 0 ranks a chosen key (+inf: always taken), PLACEHOLDER marks an invisible key and EXCLUDED a
    visible key that was not chosen. `valid` is True on chosen keys; an EXCLUDED pick becomes a repeat of the row's
    first id so that no unchosen visible key is ever named. A stable sort of the keys in reverse order makes the
    tie rule exact (max pooling and zero accumulations produce exact ties, and a test can state the rule). On a CPU
    a numba kernel (`_pick_scan.py`) applies the same rule without sorting every key.
    """
    kernels = numba_module("approx._pick_scan") if composite.device.type == "cpu" else None
    if kernels is not None and composite.dtype in (torch.float32, torch.float64) and k > 0:
        rows = composite.reshape(-1, composite.shape[-1]).contiguous()
        ids = torch.empty(rows.shape[0], k, dtype=torch.int64)
        valid = torch.empty(rows.shape[0], k, dtype=torch.bool)
        kernels.pick_rows(rows.numpy(), EXCLUDED, ids.numpy(), valid.numpy())
        shape = (*composite.shape[:-1], k)
        return ids.view(shape), valid.view(shape)
    k_len = composite.shape[-1]
    order = torch.sort(composite.flip(-1), dim=-1, descending=True, stable=True).indices[..., :k]
    ids = (k_len - 1) - order
    rank = composite.gather(-1, ids)
    ids = torch.where(rank == EXCLUDED, ids[..., :1], ids)
    return ids, rank >= 0


def visible_ranks(visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count (.., Q, 1), rank_from_end (.., Q, K)) of a visibility mask: how many keys each query sees, and each
    visible key's place counted from the most recent visible one (1 = most recent; meaningless on invisible keys)."""
    count = visible.sum(-1, keepdim=True)
    return count, count - visible.cumsum(-1) + 1


def chunk_offset(state: dict[str, Any], visible: torch.Tensor) -> tuple[int, int | None]:
    """(absolute position of the chunk's first query row, absolute position of cache index 0) for this call.

    The probe hands a long prefill over as consecutive chunks of query rows and then one call per decode step, and
    empties `state` at each new sequence, so counting rows gives each row's absolute position (padding rows count:
    they occupy cache slots). A real row's own key is its last visible key, so the offset is absolute position minus
    that index; it is 0 while the cache keeps every key and grows by one per step once a sliding-window cache drops
    its oldest key (transformers keeps window - 1 keys there). None: no row of the chunk is real.
    """
    rows, k_len = visible.shape[-2], visible.shape[-1]
    start = int(state.get("next_row", 0))
    state["next_row"] = start + rows
    seen = visible.flatten(0, -3).any(-1).any(0)  # (Q,): rows some batch row sees a key from (left padding: the
    real = seen.nonzero()  # batch shares positions)
    if real.numel() == 0:
        return start, None
    last = int(real[-1])
    keys = visible[..., last, :].flatten(0, -2).any(0).nonzero()  # the keys any batch row's last real query sees
    return start, start + last - int(keys[-1])


def absolute_to_cache(row: torch.Tensor, old_offset: int, new_offset: int, k_len: int) -> torch.Tensor:
    """A tensor indexed by the cache slots of an earlier call (last dim) re-indexed for this call's cache: slot j
    then is slot j + new_offset - old_offset now; slots the cache dropped vanish, new slots are 0."""
    shift = new_offset - old_offset
    kept = row[..., max(shift, 0) :]
    if shift < 0:
        kept = torch.nn.functional.pad(kept, (-shift, 0))
    if kept.shape[-1] >= k_len:
        return kept[..., :k_len]
    return torch.nn.functional.pad(kept, (0, k_len - kept.shape[-1]))
