"""The numba kernel behind `sparq` on CPUs: each row's top-k by its approximate scores and alpha, their share of the
approximate softmax, in one pass over the row, instead of a top-k, a softmax written out over every key and a
gather (three passes and a (queries x keys) float32 tensor)."""

from __future__ import annotations

import numba
import numpy as np

from .._softmax_scan import count_and_top, exp_shifted, visible_span
from .._topk_scan import PARTS, insert_descending


@numba.njit(inline="always")
def _row(r, approx, ids, valid, alpha, weights, bits, best):  # pragma: no cover - compiled
    k = ids.shape[1]
    row = approx[r]
    lo, hi = visible_span(row)
    count, top = count_and_top(row[lo:hi])
    if count == 0:
        for c in range(k):
            ids[r, c] = 0
            valid[r, c] = False
        alpha[r] = 0.0
        return
    norm = exp_shifted(row, lo, hi, top, weights, bits)
    held = 0
    for j in range(lo, hi):  # oldest first: an equal score never displaces an older key
        if row[j] > -np.inf and (held < k or row[j] > best[held - 1]):
            held = insert_descending(best, ids[r], held, row[j], j)
    share = 0.0
    for c in range(held):
        share += weights[ids[r, c]]
        valid[r, c] = True
    for c in range(held, k):  # fewer than k visible keys: repeats of the first, no weight
        ids[r, c] = ids[r, 0]
        valid[r, c] = False
    alpha[r] = share / norm


@numba.njit(parallel=True, cache=True, nogil=True)
def sparq_select(approx, ids, valid, alpha):  # pragma: no cover - compiled
    """For each row r of approx (R, K) float32 (-inf: a key the row cannot see): ids[r] (k = ids.shape[1]) = its k
    largest approximate scores' keys, largest first (fewer visible: repeats of the first, valid False; none: id 0);
    alpha[r] = their mass under the softmax of the row's approximate scores (float64)."""
    rows, width = approx.shape
    parts = min(rows, PARTS)
    for p in numba.prange(parts):
        weights = np.empty(width, dtype=np.float64)
        bits = np.empty(width, dtype=np.int64)
        best = np.empty(ids.shape[1], dtype=approx.dtype)
        for r in range(p * rows // parts, (p + 1) * rows // parts):
            _row(r, approx, ids, valid, alpha, weights, bits, best)


@numba.njit(cache=True, nogil=True)
def sparq_select_serial(approx, ids, valid, alpha):  # pragma: no cover - compiled
    """`sparq_select` on the calling thread: a decode step's few rows cost less than waking numba's pool."""
    weights = np.empty(approx.shape[1], dtype=np.float64)
    bits = np.empty(approx.shape[1], dtype=np.int64)
    best = np.empty(ids.shape[1], dtype=approx.dtype)
    for r in range(approx.shape[0]):
        _row(r, approx, ids, valid, alpha, weights, bits, best)
