"""The numba kernel behind `topk.row_topk` on CPUs: imported only when first needed (numba takes ~0.4 s to import).

Compiled on first use and cached beside this file (`cache=True`), so later processes load it in milliseconds.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(parallel=True, cache=True, nogil=True)
def skip_scan(rows, maxima, block, values, indices):  # pragma: no cover - compiled
    """For each row of `rows` (R, W) with block maxima `maxima` (R, W // block): the k = values.shape[1] largest
    scores into `values` (largest first) and their column ids into `indices`, reading only the blocks whose maximum
    beats the current k-th best. A row with fewer than k finite scores keeps -inf placeholders in the last slots."""
    count, width = rows.shape
    k = values.shape[1]
    blocks = maxima.shape[1]
    for r in numba.prange(count):
        best, where, row = values[r], indices[r], rows[r]
        for j in range(k):
            best[j] = -np.inf
            where[j] = j
        threshold = best[k - 1]
        for b in range(blocks + 1):
            if b < blocks:
                if maxima[r, b] <= threshold:
                    continue
                start, end = b * block, (b + 1) * block
            else:  # the last, partial block
                start, end = blocks * block, width
            for j in range(start, end):
                v = row[j]
                if v > threshold:
                    p = k - 1
                    while p > 0 and best[p - 1] < v:
                        best[p] = best[p - 1]
                        where[p] = where[p - 1]
                        p -= 1
                    best[p] = v
                    where[p] = j
                    threshold = best[k - 1]
