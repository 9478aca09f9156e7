"""The numba kernel behind `_cache_common.pick` on CPUs: each row's k largest ranks with ties to the more recent
key, by one pass from the newest key backwards that keeps the k best in order (O(K + accepted x k) per row instead
of a stable sort of all K)."""

from __future__ import annotations

import numba
import numpy as np

from .._topk_scan import BLOCK, insert_descending


@numba.njit(parallel=True, cache=True, nogil=True)
def pick_rows(composite, excluded, ids, valid):  # pragma: no cover - compiled
    """For each row r of composite (R, K): ids[r] (k = ids.shape[1]) = the keys of the k largest values, largest
    first, an equal value ranked after the more recent (larger index) key; valid[r] = value >= 0; an id whose value
    equals `excluded` is replaced by the row's first id."""
    rows, width = composite.shape
    k = ids.shape[1]
    for r in numba.prange(rows):
        best = np.empty(k, dtype=composite.dtype)
        held = 0
        for j in range(width - 1, -1, -1):
            value = composite[r, j]
            if held < k or value > best[k - 1]:  # behind equal values, which are more recent
                held = insert_descending(best, ids[r], held, value, j)
        for c in range(k):
            valid[r, c] = best[c] >= 0
            if best[c] == excluded:
                ids[r, c] = ids[r, 0]


# Pieces of the eviction methods' kernels (`_h2o_scan.py`, `_snapkv_scan.py`), which write a row's ids in pick's
# order: the keys always kept, then the ranked ones, then invisible placeholders. Each returns the ids written so far.


@numba.njit(inline="always")
def take_recent(row, count, ids, valid, found):  # pragma: no cover - compiled
    """The row's `count` most recent visible keys (row: float32 logits, -inf invisible), most recent first, into
    ids/valid from slot `found`. Returns (ids written, the key before the oldest taken + 1)."""
    j = row.shape[0] - 1
    taken = 0
    while taken < count:
        if row[j] > -np.inf:
            ids[found] = j
            valid[found] = True
            found += 1
            taken += 1
        j -= 1
    return found, j + 1


@numba.njit(inline="always")
def take_ranked(best_id, held, ids, valid, found):  # pragma: no cover - compiled
    """The `held` keys of a ranked list (best first) into ids/valid from slot `found`."""
    for h in range(held):
        ids[found] = best_id[h]
        valid[found] = True
        found += 1
    return found


@numba.njit(inline="always")
def fill_invisible(row, ids, valid, found):  # pragma: no cover - compiled
    """The rest of ids (from slot `found`) with the row's invisible keys, most recent first, valid False."""
    k = ids.shape[0]
    for j in range(row.shape[0] - 1, -1, -1):
        if found == k:
            break
        if not row[j] > -np.inf:
            ids[found] = j
            valid[found] = False
            found += 1
    return found


@numba.njit(fastmath={"nnan", "nsz"})
def largest(values):  # pragma: no cover - compiled
    """The largest of a float64 slice: a reduction the compiler vectorises, by which a kernel passes over a whole
    block of ranked keys that cannot enter its list (ranks here are accumulated attention or votes, never NaN)."""
    top = -np.inf
    for j in range(values.shape[0]):
        top = values[j] if values[j] > top else top
    return top


@numba.njit(inline="always")
def take_best_newest_first(row, ranks, lo, end, floor, best, best_id):  # pragma: no cover - compiled
    """The keys j in [lo, end) the row sees (row: float32 logits, -inf invisible) with the largest ranks[j] >= floor,
    at most best.shape[0] of them, into best / best_id, largest first. Walked newest first, so an equal rank never
    displaces a more recent key; BLOCK keys at a time, so a block whose largest rank is below `floor`, or not above
    a full list's last entry, is passed over whole (`largest`). Returns how many were taken."""
    cap = best.shape[0]
    held = 0
    if cap == 0:
        return 0
    while end > lo:
        start = max(end - BLOCK, lo)
        if held < cap and floor == -np.inf:  # (every visible key enters until the list is full)
            enter = True
        else:
            most = largest(ranks[start:end])
            enter = most >= floor and (held < cap or most > best[held - 1])
        if enter:
            for j in range(end - 1, start - 1, -1):
                rank = ranks[j]
                if row[j] > -np.inf and rank >= floor and (held < cap or rank > best[held - 1]):
                    held = insert_descending(best, best_id, held, rank, j)
        end = start
    return held
