"""The numba kernel behind `ivf` on CPUs: each query's static keys, its search of the keys in the lists it probes,
and its attention over both, one row at a time.

As tensor operations the search scored every key exactly and masked the unprobed ones (a (queries x keys) matmul, a
top-k over every key, a scatter and a second top-k to order the chosen set). Here a row scores only the keys of its
probed lists, as the rule says.

Compiled on first use and cached beside this file (`cache=True`).
"""

from __future__ import annotations

import numba
import numpy as np

from .._topk_scan import PARTS, insert_descending
from ._attend_scan import attend_picked_row, key_score


@numba.njit(cache=True, nogil=True)
def list_members(lists, nlist, members, offsets):  # pragma: no cover - compiled
    """Each group's inverted lists by a counting sort of lists (G, K) (key j's list): members (G, K) the keys grouped
    by list, in key order within one; offsets (G, nlist + 1) where each list starts in them. O(K) per group, cheap
    enough to redo at every decode step."""
    groups, length = lists.shape
    for g in range(groups):
        for l in range(nlist + 1):
            offsets[g, l] = 0
        for j in range(length):
            offsets[g, lists[g, j] + 1] += 1
        for l in range(nlist):
            offsets[g, l + 1] += offsets[g, l]
        for j in range(length):  # (offsets[g, l] runs ahead as list l fills, then is put back)
            l = lists[g, j]
            members[g, offsets[g, l]] = j
            offsets[g, l] += 1
        for l in range(nlist, 0, -1):
            offsets[g, l] = offsets[g, l - 1]
        offsets[g, 0] = 0


@numba.njit(fastmath={"contract"})
def _row(
    r, query, keys, values, row_group, visible, row_mask, members, offsets, probed, sinks, window, scaling, softcap,
    ids, searched, out, best, where, picked, scores, acc,
):  # pragma: no cover - compiled
    k = ids.shape[1]
    key_len = visible.shape[1]
    group, mask = row_group[r], visible[row_mask[r]]
    # The static keys: the first `sinks` and the last `window` visible keys (all of them when they overlap).
    first_end, found = 0, 0  # keys below first_end that are visible are sinks
    for j in range(key_len):
        if found == sinks:
            break
        if mask[j]:
            found += 1
            first_end = j + 1
    last_start, found = key_len, 0  # keys from last_start on that are visible are in the window
    for j in range(key_len - 1, -1, -1):
        if found == window:
            break
        if mask[j]:
            found += 1
            last_start = j
    count = 0
    for j in range(first_end):  # (in key order: the sinks, then the window)
        if mask[j] and count < k:
            picked[count] = j
            count += 1
    for j in range(max(last_start, first_end), key_len):
        if mask[j] and count < k:
            picked[count] = j
            count += 1
    budget = k - count
    # The search: visible, non-static keys of the lists this row probes, the `budget` best by exact score.
    # Walked list by list (members[group, offsets[group, l]:offsets[group, l + 1]], keys in order), so a row reads
    # only its probed lists' keys; equal scores are ranked by key (the older first), as a walk in key order ranks them.
    held, scanned = 0, 0
    for l in range(probed.shape[1]):
        if not probed[r, l]:
            continue
        for m in range(offsets[group, l], offsets[group, l + 1]):
            j = members[group, m]
            if j < first_end or j >= last_start or not mask[j]:
                continue
            scanned += 1
            if budget == 0:
                continue
            s = key_score(r, query, keys, group, j, scaling, softcap)
            if held < budget or s > best[budget - 1] or (s == best[budget - 1] and j < where[budget - 1]):
                held = insert_descending(best[:budget], where[:budget], held, s, j, True)
    searched[r] = scanned
    for c in range(held):
        picked[count + c] = where[c]
    count += held
    filler = -1
    if count < k:  # placeholders needed: the row's first invisible key
        for j in range(key_len):
            if not mask[j]:
                filler = j
                break
    for c in range(k):
        if c < count:
            ids[r, c] = picked[c]
        else:
            ids[r, c] = filler if filler >= 0 else picked[0]
    attend_picked_row(r, query, keys, values, group, picked, count, scaling, softcap, scores, acc, out)


@numba.njit(inline="always")
def _scratch(k, value_dim):  # pragma: no cover - compiled
    return (
        np.empty(k, dtype=np.float32), np.empty(k, dtype=np.int64), np.empty(k, dtype=np.int64),
        np.empty(k, dtype=np.float32), np.empty(value_dim, dtype=np.float64),
    )


@numba.njit(parallel=True, cache=True, nogil=True)
def ivf_attend(
    query, keys, values, row_group, visible, row_mask, members, offsets, probed, sinks, window, scaling, softcap, ids,
    searched, out,
):  # pragma: no cover - compiled
    """For each row r (a query of one head): its static keys (the first `sinks` and last `window` visible keys) and
    the best k - static visible keys by exact score among the others in the lists it probes (probed[r, list]; list
    l of group g holds keys members[g, offsets[g, l]:offsets[g, l + 1]], in key order); their ids into ids[r] (then
    filler: an invisible key, else the first id), how many keys it searched into searched[r], and the softmax
    attention over the chosen keys into out[r].

    query (R, D) float32; keys/values (G, K, D) with row_group (R,); visible (M, K) bool with row_mask (R,)."""
    rows = ids.shape[0]
    parts = min(rows, PARTS)
    for p in numba.prange(parts):
        best, where, picked, scores, acc = _scratch(ids.shape[1], values.shape[2])
        for r in range(p * rows // parts, (p + 1) * rows // parts):
            _row(
                r, query, keys, values, row_group, visible, row_mask, members, offsets, probed, sinks, window, scaling,
                softcap, ids, searched, out, best, where, picked, scores, acc,
            )  # fmt: skip


@numba.njit(cache=True, nogil=True)
def ivf_attend_serial(
    query, keys, values, row_group, visible, row_mask, members, offsets, probed, sinks, window, scaling, softcap, ids,
    searched, out,
):  # pragma: no cover - compiled
    """`ivf_attend` on the calling thread, for a decode step's few rows."""
    best, where, picked, scores, acc = _scratch(ids.shape[1], values.shape[2])
    for r in range(ids.shape[0]):
        _row(
            r, query, keys, values, row_group, visible, row_mask, members, offsets, probed, sinks, window, scaling,
            softcap, ids, searched, out, best, where, picked, scores, acc,
        )  # fmt: skip
