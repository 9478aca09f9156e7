"""The numba kernels behind `quest` on CPUs: the bound of a partly visible page, and each query's best keys inside the
pages it reads, scored, kept and attended one row at a time.

As tensor operations Quest scored every key exactly (a (queries x keys) matmul) only to read the pages it chose, and
summarised each partly visible page by gathering a (size x D) block per (query, page): in a causal prefill every
query's own page is one. Here a row scores the keys of its read pages alone, in place.

Compiled on first use and cached beside this file (`cache=True`).
"""

from __future__ import annotations

import numba
import numpy as np

from .._topk_scan import PARTS, insert_descending
from ._attend_scan import attend_picked_row, key_score


@numba.njit(parallel=True, cache=True, nogil=True)
def partial_bounds(query, keys, group, page, seen, size, scaling, out):  # pragma: no cover - compiled
    """out[n] = scaling * sum_d max(q_d M_d, q_d m_d) for entry n: query[n] (N, D) against the element-wise max M and
    min m of the keys of page page[n] of group group[n] (keys (G, K, D)) that the query sees (seen (N, size))."""
    count, dim = query.shape
    for n in numba.prange(count):
        high = np.full(dim, -np.inf, dtype=np.float32)
        low = np.full(dim, np.inf, dtype=np.float32)
        for s in range(size):
            if not seen[n, s]:
                continue
            key = keys[group[n], page[n] * size + s]
            for d in range(dim):
                high[d] = max(high[d], key[d])
                low[d] = min(low[d], key[d])
        total = 0.0
        for d in range(dim):
            q = query[n, d]
            total += q * high[d] if q > 0 else (q * low[d] if q < 0 else 0.0)
        out[n] = total * scaling


@numba.njit(parallel=True, cache=True, nogil=True)
def pages_to_read(bounds, counts, row_mask, k, order, read):  # pragma: no cover - compiled
    """For each row r: the pages it reads, in decreasing bound (bounds (R, P), -inf: a page it sees nothing of; equal
    bounds in page order), into order[r, :read[r]]: each page with a visible key (counts (M, P), the row's mask row
    row_mask[r]) while the pages before it hold fewer than k visible keys.

    Each next page is the largest bound after the last one taken, in one pass over the row's bounds: a row reads
    a few pages (about k / page_size), where sorting every row's bounds cost more than the rest of the method."""
    rows, pages = bounds.shape
    for r in numba.prange(rows):
        counted = counts[row_mask[r]]
        last, last_page = np.inf, -1
        held, taken = 0, 0
        while held < k:
            top, at = -np.inf, -1
            for p in range(pages):
                b = bounds[r, p]
                if b > top and (b < last or (b == last and p > last_page)):
                    top, at = b, p
            if at < 0:  # no page with a visible key left
                break
            if counted[at] > 0:
                order[r, taken] = at
                taken += 1
                held += counted[at]
            last, last_page = top, at
        read[r] = taken


@numba.njit(fastmath={"contract"})
def _row(
    r, query, keys, values, row_group, visible, row_mask, order, read, size, scaling, softcap, hidden, ids, out,
    best, where, scores, acc,
):  # pragma: no cover - compiled
    k = ids.shape[1]
    key_len = keys.shape[1]
    group, mask = row_group[r], visible[row_mask[r]]
    held = 0
    for c in range(read[r]):
        start = order[r, c] * size
        for j in range(start, min(start + size, key_len)):
            if not mask[j]:
                continue
            s = key_score(r, query, keys, group, j, scaling, softcap)
            if held < k or s > best[k - 1]:
                held = insert_descending(best, where, held, s, j)
    for c in range(k):
        ids[r, c] = where[c] if c < held else hidden[row_mask[r]]
    attend_picked_row(r, query, keys, values, group, where, held, scaling, softcap, scores, acc, out)


@numba.njit(inline="always")
def _scratch(k, value_dim):  # pragma: no cover - compiled
    return (
        np.empty(k, dtype=np.float32), np.empty(k, dtype=np.int64), np.empty(k, dtype=np.float32),
        np.empty(value_dim, dtype=np.float64),
    )


@numba.njit(parallel=True, cache=True, nogil=True)
def quest_attend(
    query, keys, values, row_group, visible, row_mask, order, read, size, scaling, softcap, hidden, ids, out
):  # pragma: no cover - compiled
    """For each row r (a query of one head): the k = ids.shape[1] visible keys with the largest exact scores among
    the pages order[r, :read[r]] (pages of `size` keys, as `pages_to_read` lists them), largest first, into ids[r]
    (then the row's first invisible key hidden[row_mask[r]] in slots with no key left); the softmax attention over
    them into out[r].

    query (R, D) float32; keys/values (G, K, D) with row_group (R,); visible (M, K) bool with row_mask (R,)."""
    rows = ids.shape[0]
    parts = min(rows, PARTS)
    for p in numba.prange(parts):
        best, where, scores, acc = _scratch(ids.shape[1], values.shape[2])
        for r in range(p * rows // parts, (p + 1) * rows // parts):
            _row(
                r, query, keys, values, row_group, visible, row_mask, order, read, size, scaling, softcap, hidden,
                ids, out, best, where, scores, acc,
            )  # fmt: skip


@numba.njit(cache=True, nogil=True)
def quest_attend_serial(
    query, keys, values, row_group, visible, row_mask, order, read, size, scaling, softcap, hidden, ids, out
):  # pragma: no cover - compiled
    """`quest_attend` on the calling thread, for a decode step's few rows."""
    best, where, scores, acc = _scratch(ids.shape[1], values.shape[2])
    for r in range(ids.shape[0]):
        _row(
            r, query, keys, values, row_group, visible, row_mask, order, read, size, scaling, softcap, hidden, ids,
            out, best, where, scores, acc,
        )  # fmt: skip
