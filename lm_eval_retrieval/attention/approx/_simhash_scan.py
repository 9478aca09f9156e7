"""The numba kernel behind `simhash` on CPUs: codes compared by popcount, the k best keys picked by counting, and
attention over them, one row at a time, so no (queries x keys) matrix is ever written.

Compiled on first use and cached beside this file (`cache=True`).
"""

from __future__ import annotations

import numba
import numpy as np


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


@numba.njit(parallel=True, cache=True, nogil=True, fastmath={"contract"})
def simhash_attend(
    query_proj, key_proj, row_group, visible, row_mask, query, keys, values, scaling, softcap, ids, out
):  # pragma: no cover - compiled
    """For each row r (a query of one head): the k = ids.shape[1] visible keys whose codes differ from the row's
    code in the fewest bits, ties to the more recent key, into `ids`; the softmax attention over them into `out`.

    query_proj (R, bits) and key_proj (G, K, bits): projections on the hyperplanes, whose signs are the codes;
    row_group (R,): the row's (batch x KV head) index into key_proj/keys/values (G, K, D); visible (M, K) bool and
    row_mask (R,): the row's mask row; query (R, D) float32. A row with fewer than k visible keys takes them all and
    fills the rest of its ids with invisible keys, which get no weight; a row that sees nothing gets 0.
    """
    count, k = ids.shape
    groups, key_len, bits = key_proj.shape
    dim = query.shape[1]
    key_codes = np.empty((groups, key_len), dtype=np.int64)
    for g in numba.prange(groups * key_len):
        key_codes[g // key_len, g % key_len] = _code(key_proj[g // key_len, g % key_len])
    for r in numba.prange(count):
        group, mask, code = row_group[r], visible[row_mask[r]], _code(query_proj[r])
        histogram = np.zeros(bits + 1, dtype=np.int64)
        for j in range(key_len):
            if mask[j]:
                histogram[_popcount(code ^ key_codes[group, j])] += 1
        # The cut: every key closer than `level` is taken, and the most recent `room` keys at `level`.
        taken, level = 0, 0
        while level <= bits and taken + histogram[level] < k:
            taken += histogram[level]
            level += 1
        room = k - taken
        found = 0
        for j in range(key_len - 1, -1, -1):  # newest first, so ties at the cut go to the more recent keys
            if mask[j]:
                distance = _popcount(code ^ key_codes[group, j])
                if distance < level or (distance == level and room > 0):
                    if distance == level:
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
        # Exact softmax attention over the chosen keys.
        for d in range(dim):
            out[r, d] = 0.0
        if chosen == 0:
            continue
        scores = np.empty(chosen, dtype=np.float32)
        top = -np.inf
        for c in range(chosen):
            key = keys[group, ids[r, c]]
            s = 0.0
            for d in range(dim):
                s += query[r, d] * key[d]
            s *= scaling
            if softcap > 0.0:
                s = softcap * np.tanh(s / softcap)
            scores[c] = s
            top = max(top, s)
        total = 0.0
        for c in range(chosen):
            w = np.exp(scores[c] - top)
            total += w
            value = values[group, ids[r, c]]
            for d in range(dim):
                out[r, d] += w * value[d]
        for d in range(dim):
            out[r, d] /= total
