"""The numba kernels behind `simhash` on CPUs: codes compared by popcount, the k best keys picked by counting, and
attention over them, one row at a time, so no (queries x keys) matrix is ever written. Key codes are packed once
per key (`pack_codes`) and kept by the caller for the rest of the sequence.

Compiled on first use and cached beside this file (`cache=True`).
"""

from __future__ import annotations

import numba
import numpy as np

from .._topk_scan import PARTS
from ._attend_scan import attend_picked_row

@numba.njit(inline="always")
def _popcount(x):  # pragma: no cover - compiled
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    return (x * 0x0101010101010101) >> 56


@numba.njit(inline="always")
def _code(projections):  # pragma: no cover - compiled
    """Bit i set where projection i is positive."""
    code = 0
    for i in range(projections.shape[0]):
        if projections[i] > 0:
            code |= 1 << i
    return code


@numba.njit(parallel=True, cache=True, nogil=True)
def pack_codes(projections, codes, start):  # pragma: no cover - compiled
    """codes[g, j] = the packed signs of projections[g, j - start] for every j >= start (G, K) int64."""
    groups, length = projections.shape[0], projections.shape[1]
    for g in numba.prange(groups * length):
        codes[g // length, start + g % length] = _code(projections[g // length, g % length])


@numba.njit(inline="always")
def _scratch(key_len, k, value_dim):  # pragma: no cover - compiled
    """One thread's working memory, reused by every row it takes (an allocation per row cost more than its keys)."""
    return (
        np.empty(key_len, dtype=np.int32), np.empty(key_len + 1, dtype=np.int32), np.empty(k, dtype=np.float32),
        np.empty(value_dim, dtype=np.float64),
    )


@numba.njit(inline="always", fastmath={"contract"})
def _attend_row(
    r, query_proj, key_codes, bits, row_group, visible, row_mask, row_end, query, keys, values, scaling, softcap,
    ids, out, distance, candidates, scores, acc,
):  # pragma: no cover - compiled
    k = ids.shape[1]
    key_len = visible.shape[1]
    far = np.int32(bits + 2)  # the distance an invisible key gets: beyond any level, never taken
    group, mask, code = row_group[r], visible[row_mask[r]], _code(query_proj[r])
    end, codes = row_end[row_mask[r]], key_codes[group]
    for j in range(end):
        distance[j] = np.int32(_popcount(code ^ codes[j])) if mask[j] else far
    # The cut: every key closer than `level` is taken, and the most recent `room` keys at `level`. The level is
    # found by counting the keys within each distance in turn: branch-free passes the compiler vectorises, which
    # beat one histogram (whose increments of one bin wait on each other) for the few levels k needs.
    taken, level = 0, 0
    while level <= bits:
        within = np.int32(0)
        for j in range(end):
            within -= (distance[j] - level - 1) >> 31  # -1 where distance <= level
        if within >= k:
            break
        taken = within
        level += 1
    room = k - taken
    # The keys within `level`, oldest first, gathered without a branch (each key is written, the count moves only
    # past a key within); then walked newest first, so ties at the cut go to the more recent keys.
    count = 0
    for j in range(end):
        candidates[count] = j
        count -= (distance[j] - level - 1) >> 31
    found = 0
    for c in range(count - 1, -1, -1):
        j = candidates[c]
        if distance[j] < level or room > 0:
            if distance[j] == level:
                room -= 1
            ids[r, found] = j
            found += 1
            if found == k:
                break
    chosen = found
    for j in range(key_len):  # fewer than k visible keys: invisible placeholders
        if found == k:
            break
        if not mask[j]:
            ids[r, found] = j
            found += 1
    attend_picked_row(r, query, keys, values, group, ids[r], chosen, scaling, softcap, scores, acc, out)


@numba.njit(parallel=True, cache=True, nogil=True)
def simhash_attend(
    query_proj, key_codes, bits, row_group, visible, row_mask, row_end, query, keys, values, scaling, softcap, ids,
    out,
):  # pragma: no cover - compiled
    """For each row r (a query of one head): the k = ids.shape[1] visible keys whose codes differ from the row's
    code in the fewest bits, ties to the more recent key, into `ids`; the softmax attention over them into `out`.

    query_proj (R, bits): the row's projections on the hyperplanes, whose signs are its code; key_codes (G, K):
    the keys' packed codes (`pack_codes`); row_group (R,): the row's (batch x KV head) index into key_codes and
    keys/values (G, K, D); visible (M, K) bool and row_mask (R,): the row's mask row; row_end (M,): one past the
    last visible key of each mask row (no key after it is read); query (R, D) float32. A row with fewer than k
    visible keys takes them all and fills the rest of its ids with invisible keys, which get no weight; a row that
    sees nothing gets 0.
    """
    rows = ids.shape[0]
    parts = min(rows, PARTS)
    for p in numba.prange(parts):
        distance, candidates, scores, acc = _scratch(visible.shape[1], ids.shape[1], values.shape[2])
        for r in range(p * rows // parts, (p + 1) * rows // parts):
            _attend_row(
                r, query_proj, key_codes, bits, row_group, visible, row_mask, row_end, query, keys, values, scaling,
                softcap, ids, out, distance, candidates, scores, acc,
            )  # fmt: skip


@numba.njit(cache=True, nogil=True)
def simhash_attend_serial(
    query_proj, key_codes, bits, row_group, visible, row_mask, row_end, query, keys, values, scaling, softcap, ids,
    out,
):  # pragma: no cover - compiled
    """`simhash_attend` on the calling thread: a decode step's few rows cost less than waking numba's pool."""
    distance, candidates, scores, acc = _scratch(visible.shape[1], ids.shape[1], values.shape[2])
    for r in range(ids.shape[0]):
        _attend_row(
            r, query_proj, key_codes, bits, row_group, visible, row_mask, row_end, query, keys, values, scaling,
            softcap, ids, out, distance, candidates, scores, acc,
        )  # fmt: skip


@numba.njit(parallel=True, cache=True, nogil=True)
def row_extents(visible, counts, ends):  # pragma: no cover - compiled
    """For each mask row m of visible (M, K) bool: counts[m], its visible keys; ends[m], one past its last one (0
    if none). Torch would convert the whole mask to integers for each."""
    for m in numba.prange(visible.shape[0]):
        row = visible[m]
        end = row.shape[0]
        while end > 0 and not row[end - 1]:
            end -= 1
        count = 0
        for j in range(end):
            count += row[j]
        counts[m], ends[m] = count, end
