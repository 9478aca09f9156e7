"""The numba kernels behind `simhash` on CPUs: codes compared by popcount, the k best keys picked in one walk back
from the newest key, and attention over them, one row at a time, so no (queries x keys) matrix is ever written. Key
codes are packed once per key (`extend_codes`) and kept by the caller for the rest of the sequence.

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
        code |= np.int64(projections[i] > 0) << i  # no branch: random signs would mispredict half of them
    return code


@numba.njit(cache=True, nogil=True)
def extend_codes(projections, codes, start, keys, first, last):  # pragma: no cover - compiled
    """Extend the kept codes of keys (G, K, D) float32 from key `start` on, if the kept ones are still theirs.

    They are trusted when start is 0, or when first[g] and last[g] (G, D), the first key and the last key the codes
    were packed for, still equal keys[g, 0] and keys[g, start - 1]. Then codes[g, j] for j >= start become the
    packed signs of projections[g, j - start], first and last follow the keys, and K is returned; otherwise
    nothing is written and 0 is returned (the caller packs every key afresh). One pass on the calling thread: a
    decode step has one key per group, and even a prefill's keys pack in well under a millisecond."""
    groups, length, dim = keys.shape
    if start > 0:
        for g in range(groups):
            for d in range(dim):
                if keys[g, 0, d] != first[g, d] or keys[g, start - 1, d] != last[g, d]:
                    return 0
    for g in range(groups):
        for j in range(projections.shape[1]):
            codes[g, start + j] = _code(projections[g, j])
        for d in range(dim):
            first[g, d] = keys[g, 0, d]
            last[g, d] = keys[g, length - 1, d]
    return length


BLOCK = 16  # keys whose distances are computed together before any of them is looked at
LEVELS = 64  # distances 0..bits (bits <= 62) and one level above them


@numba.njit(inline="always")
def _scratch(k, value_dim):  # pragma: no cover - compiled
    """One thread's working memory, reused by every row it takes (an allocation per row cost more than its keys):
    a block's distances; the k kept keys and the stack links between them; the attention's scores and sum; each
    distance's stack top and size."""
    return (
        np.empty(BLOCK, dtype=np.int32), np.empty(k, dtype=np.int64), np.empty(k, dtype=np.int32),
        np.empty(k, dtype=np.float32), np.empty(value_dim, dtype=np.float64), np.empty(LEVELS, dtype=np.int32),
        np.empty(LEVELS, dtype=np.int32),
    )


@numba.njit(inline="always")
def _push(slot, key, dist, slot_key, below, top, held):  # pragma: no cover - compiled
    """Keep `key` in `slot`, on top of distance `dist`'s stack."""
    slot_key[slot] = key
    below[slot] = top[dist]
    top[dist] = slot
    held[dist] += 1


@numba.njit(fastmath={"contract"})
def _attend_row(
    r, query_proj, key_codes, bits, row_group, visible, row_mask, counts, row_end, query, keys, values, scaling,
    softcap, ids, out, block, slot_key, below, scores, acc, top, held,
):  # pragma: no cover - compiled
    k = ids.shape[1]
    key_len = visible.shape[1]
    far = np.int32(64)  # added to an invisible key's distance: beyond any level, never taken
    group, mask, code = row_group[r], visible[row_mask[r]].view(np.uint8), _code(query_proj[r])
    end, codes = row_end[row_mask[r]], key_codes[group]
    # Every key before the end visible (a causal row without padding): no mask to read, which cost 40 % of the walk.
    dense = counts[row_mask[r]] == end
    # One walk from the newest key back: the k best so far sit in `slot_key`, threaded per distance into stacks
    # (`top[d]` the slot last pushed at distance d, `below` the one pushed before it). Walking newest first, the
    # last key pushed at the worst distance is the oldest one there: the one to give up for a closer key, so ties
    # go to the more recent keys. Distances are computed a block at a time, and a block none of whose keys beats
    # the worst kept distance (the usual case once k keys are held) is passed over without a branch per key.
    for d in range(bits + 2):
        top[d], held[d] = -1, 0
    filled, worst = 0, np.int32(bits + 1)  # worst: a key is taken only if strictly closer (or fewer than k held)
    hi = end
    while hi > 0:
        lo = max(0, hi - BLOCK)
        span = hi - lo
        best = far
        if dense:
            for t in range(span):
                dist = np.int32(_popcount(code ^ codes[lo + t]))
                block[t] = dist
                best = min(best, dist)
        else:
            for t in range(span):
                j = lo + t
                dist = np.int32(_popcount(code ^ codes[j])) + (np.int32(1) - np.int32(mask[j])) * far
                block[t] = dist
                best = min(best, dist)
        if best < worst or (filled < k and best < far):
            for t in range(span - 1, -1, -1):
                dist = block[t]
                if dist >= far:
                    continue
                if filled < k:
                    slot = filled
                    filled += 1
                    _push(slot, lo + t, dist, slot_key, below, top, held)
                    if filled == k:  # full: from now on a key must beat the worst distance held
                        while held[worst] == 0:
                            worst -= 1
                elif dist < worst:
                    slot = top[worst]
                    top[worst] = below[slot]
                    held[worst] -= 1
                    _push(slot, lo + t, dist, slot_key, below, top, held)
                    # The worst distance only falls, and never below this key's: a step down from where it was
                    # (counting down from the top at every replacement cost a third of the whole kernel).
                    while held[worst] == 0:
                        worst -= 1
        hi = lo
    # Newest first, as the keys were met.
    chosen = filled
    for a in range(1, chosen):
        key = slot_key[a]
        b = a - 1
        while b >= 0 and slot_key[b] < key:
            slot_key[b + 1] = slot_key[b]
            b -= 1
        slot_key[b + 1] = key
    for c in range(chosen):
        ids[r, c] = slot_key[c]
    found = chosen
    for j in range(key_len):  # fewer than k visible keys: invisible placeholders
        if found == k:
            break
        if not visible[row_mask[r], j]:
            ids[r, found] = j
            found += 1
    attend_picked_row(r, query, keys, values, group, ids[r], chosen, scaling, softcap, scores, acc, out)


@numba.njit(inline="always")
def row_extent(visible, counts, ends, m):  # pragma: no cover - compiled
    """counts[m] and ends[m]: mask row m's visible keys, and one past its last one (shared with magicpig's kernel)."""
    row = visible[m]
    end = row.shape[0]
    while end > 0 and not row[end - 1]:
        end -= 1
    count = 0
    for j in range(end):
        count += row[j]
    counts[m], ends[m] = count, end


@numba.njit(parallel=True, cache=True, nogil=True)
def simhash_attend(
    query_proj, key_codes, bits, row_group, visible, row_mask, counts, row_end, query, keys, values, scaling, softcap,
    ids, out,
):  # pragma: no cover - compiled
    """For each row r (a query of one head): the k = ids.shape[1] visible keys whose codes differ from the row's
    code in the fewest bits, ties to the more recent key, into `ids`; the softmax attention over them into `out`.

    query_proj (R, bits): the row's projections on the hyperplanes, whose signs are its code; key_codes (G, >= K):
    the keys' packed codes (`extend_codes`); row_group (R,): the row's (batch x KV head) index into key_codes and
    keys/values (G, K, D); visible (M, K) bool and row_mask (R,): the row's mask row; counts and row_end (M,) int64,
    written first: each mask row's visible keys, and one past its last one (no key after it is read; torch would
    convert the whole mask to integers for each); query (R, D) float32. A row with fewer than k
    visible keys takes them all and fills the rest of its ids with invisible keys, which get no weight; a row that
    sees nothing gets 0.
    """
    for m in numba.prange(visible.shape[0]):
        row_extent(visible, counts, row_end, m)
    rows = ids.shape[0]
    parts = min(rows, PARTS)
    for p in numba.prange(parts):
        block, slot_key, below, scores, acc, top, held = _scratch(ids.shape[1], values.shape[2])
        for r in range(p * rows // parts, (p + 1) * rows // parts):
            _attend_row(
                r, query_proj, key_codes, bits, row_group, visible, row_mask, counts, row_end, query, keys, values,
                scaling, softcap, ids, out, block, slot_key, below, scores, acc, top, held,
            )  # fmt: skip


@numba.njit(cache=True, nogil=True)
def simhash_attend_serial(
    query_proj, key_codes, bits, row_group, visible, row_mask, counts, row_end, query, keys, values, scaling, softcap,
    ids, out,
):  # pragma: no cover - compiled
    """`simhash_attend` on the calling thread: a decode step's few rows cost less than waking numba's pool."""
    for m in range(visible.shape[0]):
        row_extent(visible, counts, row_end, m)
    block, slot_key, below, scores, acc, top, held = _scratch(ids.shape[1], values.shape[2])
    for r in range(ids.shape[0]):
        _attend_row(
            r, query_proj, key_codes, bits, row_group, visible, row_mask, counts, row_end, query, keys, values,
            scaling, softcap, ids, out, block, slot_key, below, scores, acc, top, held,
        )  # fmt: skip
