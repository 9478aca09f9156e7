"""The numba kernels behind `common.attend_valid` (and `attend_over_picked`, which calls it) and `streaming`'s ids on
CPUs: each query's exact softmax attention over the keys its method picked, one row at a time.

As tensor operations that step copies every picked key and value row per query head ((B, Hq, Q, k, D) twice),
scores them with a batched matmul of one row each, and normalises: at 2k tokens and k = 32 it cost streaming more
than choosing its keys. Here each row reads its k keys and values in place.

Compiled on first use and cached beside this file (`cache=True`).
"""

from __future__ import annotations

import numba
import numpy as np

from .._topk_scan import PARTS


@numba.njit(fastmath={"contract", "reassoc", "nsz"})
def key_score(r, query, keys, group, j, scaling, softcap):  # pragma: no cover - compiled
    """The scaled (and soft-capped where softcap > 0) score of query row r against key j of group `group`.

    The dot product may add its terms in any order ("reassoc"), as a matmul does: summed strictly left to right, each
    add waits on the one before, and scoring the picked keys took most of every method's attention pass."""
    s = np.float32(0.0)
    for d in range(query.shape[1]):
        s += query[r, d] * keys[group, j, d]
    s *= scaling
    if softcap > 0.0:
        s = softcap * np.tanh(s / softcap)
    return s


@numba.njit(fastmath={"contract"})
def attend_picked_row(r, query, keys, values, group, picked, count, scaling, softcap, scores, acc, out):  # pragma: no cover
    """out[r] = softmax attention of query[r] over the keys picked[:count] of group `group` (0 if count is 0);
    scores (>= count) and acc (value dim) are the caller's scratch. Shared with simhash's, quest's and ivf's
    kernels."""
    top = -np.inf
    for c in range(count):
        s = key_score(r, query, keys, group, picked[c], scaling, softcap)
        scores[c] = s
        top = max(top, s)
    softmax_values_row(r, values, group, picked, count, scores, top, acc, out)


@numba.njit(fastmath={"contract"})
def softmax_values_row(r, values, group, picked, count, scores, top, acc, out):  # pragma: no cover - compiled
    """out[r] = the softmax of scores[:count] (largest `top`) over the values picked[:count] of group `group`; 0 if
    count is 0."""
    value_dim = values.shape[2]
    if count == 0:
        for d in range(value_dim):
            out[r, d] = 0.0
        return
    for d in range(value_dim):
        acc[d] = 0.0
    total = 0.0
    for c in range(count):
        w = np.exp(scores[c] - top)
        total += w
        j = picked[c]
        for d in range(value_dim):
            acc[d] += w * values[group, j, d]
    for d in range(value_dim):
        out[r, d] = acc[d] / total


@numba.njit(inline="always")
def _attend_row(r, query, keys, values, row_group, ids, valid, scaling, softcap, picked, scores, acc, out):  # pragma: no cover
    count = 0
    for c in range(ids.shape[1]):
        if valid[r, c]:
            picked[count] = ids[r, c]
            count += 1
    attend_picked_row(r, query, keys, values, row_group[r], picked, count, scaling, softcap, scores, acc, out)


@numba.njit(inline="always")
def _scratch(k, value_dim):  # pragma: no cover - compiled
    """One thread's working memory, reused by every row it takes."""
    return np.empty(k, dtype=np.int64), np.empty(k, dtype=np.float32), np.empty(value_dim, dtype=np.float64)


@numba.njit(parallel=True, cache=True, nogil=True)
def attend_ids(query, keys, values, row_group, ids, valid, scaling, softcap, out):  # pragma: no cover - compiled
    """out[r] = softmax attention of query[r] (R, D) over keys/values (G, K, D) of its group row_group[r], restricted
    to the slots c of ids[r] (R, k) with valid[r, c]; scores scaled by `scaling` and soft-capped where softcap > 0.
    A row with no valid slot gets 0."""
    rows = ids.shape[0]
    parts = min(rows, PARTS)
    for p in numba.prange(parts):
        picked, scores, acc = _scratch(ids.shape[1], values.shape[2])
        for r in range(p * rows // parts, (p + 1) * rows // parts):
            _attend_row(r, query, keys, values, row_group, ids, valid, scaling, softcap, picked, scores, acc, out)


@numba.njit(cache=True, nogil=True)
def attend_ids_serial(query, keys, values, row_group, ids, valid, scaling, softcap, out):  # pragma: no cover
    """`attend_ids` on the calling thread: a decode step's few rows cost less than waking numba's pool."""
    picked, scores, acc = _scratch(ids.shape[1], values.shape[2])
    for r in range(ids.shape[0]):
        _attend_row(r, query, keys, values, row_group, ids, valid, scaling, softcap, picked, scores, acc, out)


@numba.njit(inline="always")
def _scored_row(r, logits, values, row_group, ids, valid, picked, scores, acc, out):  # pragma: no cover - compiled
    count = 0
    top = -np.inf
    for c in range(ids.shape[1]):
        j = ids[r, c]
        if valid[r, c] and j < logits.shape[1]:  # (a valid id is a visible key, which the scores cover)
            picked[count] = j
            scores[count] = logits[r, j]
            top = max(top, scores[count])
            count += 1
    softmax_values_row(r, values, row_group[r], picked, count, scores, top, acc, out)


@numba.njit(parallel=True, cache=True, nogil=True)
def attend_scored(logits, values, row_group, ids, valid, out):  # pragma: no cover - compiled
    """`attend_ids` where the exact scores are already known: logits (R, W) holds row r's score of every key a
    valid slot can name (as the probe scored them), so each picked key costs one read instead of a dot product."""
    rows = ids.shape[0]
    parts = min(rows, PARTS)
    for p in numba.prange(parts):
        picked, scores, acc = _scratch(ids.shape[1], values.shape[2])
        for r in range(p * rows // parts, (p + 1) * rows // parts):
            _scored_row(r, logits, values, row_group, ids, valid, picked, scores, acc, out)


@numba.njit(cache=True, nogil=True)
def attend_scored_serial(logits, values, row_group, ids, valid, out):  # pragma: no cover - compiled
    """`attend_scored` on the calling thread."""
    picked, scores, acc = _scratch(ids.shape[1], values.shape[2])
    for r in range(ids.shape[0]):
        _scored_row(r, logits, values, row_group, ids, valid, picked, scores, acc, out)


@numba.njit(parallel=True, cache=True, nogil=True)
def streaming_rows(visible, sinks, window, ids, valid):  # pragma: no cover - compiled
    """For each mask row of visible (M, K) bool: its first `sinks` and last `window` visible keys, most recent first,
    into ids[m] (width w = ids.shape[1]) with valid True; then invisible keys, most recent first, valid False; then
    repeats of ids[m, 0], valid False. `_cache_common.pick` orders a composite rank the same way."""
    rows, width = visible.shape
    w = ids.shape[1]
    for m in numba.prange(rows):
        row = visible[m]
        found = 0
        lowest = width  # the oldest key the window took
        j = width - 1
        while j >= 0 and found < window and found < w:
            if row[j]:
                ids[m, found] = j
                valid[m, found] = True
                found += 1
                lowest = j
            j -= 1
        # the sinks: the first visible keys below the window, written after it, most recent first
        taken = 0
        for j in range(lowest):
            if taken == sinks or found + taken == w:
                break
            taken += row[j]
        count = 0
        for j in range(lowest):
            if count == taken:
                break
            if row[j]:
                ids[m, found + taken - 1 - count] = j
                valid[m, found + taken - 1 - count] = True
                count += 1
        found += taken
        j = width - 1
        while found < w and j >= 0:
            if not row[j]:
                ids[m, found] = j
                valid[m, found] = False
                found += 1
            j -= 1
        while found < w:
            ids[m, found] = ids[m, 0]
            valid[m, found] = False
            found += 1
