"""The numba kernel behind `_cache_common.pick` on CPUs: each row's k largest ranks with ties to the more recent
key, by one pass from the newest key backwards that keeps the k best in order (O(K + accepted x k) per row instead
of a stable sort of all K)."""

from __future__ import annotations

import numba
import numpy as np

from .._topk_scan import insert_descending


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
