"""The numba kernel behind `h2o` on CPUs: the heavy hitters of every query row and the accumulation of attention,
walked row by row, so the (queries x keys) cumulative sum, the full sort of every row and the float64 copies the
tensor rule needs are never made. Parallel over (batch x query head) sequences, sequential within one (each row's
heavy hitters depend on every row above it).
"""

from __future__ import annotations

import numba
import numpy as np

from .._softmax_scan import count_and_top, exp_shifted, visible_span
from ._pick_scan import fill_invisible, take_best_newest_first, take_ranked, take_recent


@numba.njit(fastmath={"contract", "nsz"})
def _accumulate(weights, scale, acc):  # pragma: no cover - compiled
    """acc += weights x scale (slices: vectorised)."""
    for j in range(weights.shape[0]):
        acc[j] += weights[j] * scale


@numba.njit(inline="always")
def _heavy_floor(row, acc, oldest, previous, held):  # pragma: no cover - compiled
    """A lower bound on this row's heavy-th largest accumulated attention among its older keys: the least acc of the
    previous row's heavy hitters, where all of them are older keys this row sees too (acc only grows along a
    sequence, so they still hold at least that much). -inf where that does not hold."""
    if held == 0:
        return -np.inf
    floor = np.inf
    for h in range(held):
        j = previous[h]
        if j >= oldest or not row[j] > -np.inf:
            return -np.inf
        floor = min(floor, acc[j])
    return floor


@numba.njit(parallel=True, cache=True, nogil=True)
def h2o_select(logits, acc, heavy, ids, valid, counts):  # pragma: no cover - compiled
    """For each sequence g and query row i of logits (G, Q, K) float32 (-inf: a key the row cannot see):

    * counts[g, i] = the visible keys;
    * ids[g, i] (k = ids.shape[2]) = its k - heavy most recent visible keys, then the `heavy` other visible keys of
      largest acc (ties to the more recent), where acc[g] (K) float64 holds the attention summed over every earlier
      row; a row that sees at most k keys takes them all, and the rest of its ids are its invisible keys, most
      recent first; valid[g, i] marks the chosen ids. Order: as `_cache_common.pick` ranks them;
    * then acc[g] += the row's exact softmax (float64).

    The heavy hitters are looked for newest first, BLOCK keys at a time: a block whose largest acc cannot enter the
    list (below `_heavy_floor`, or not above the list's last entry once it is full) is passed over whole.
    """
    groups, rows, width = logits.shape
    k = ids.shape[2]
    recent_count = k - heavy
    for g in numba.prange(groups):
        best_acc = np.empty(heavy, dtype=np.float64)
        best_id = np.empty(heavy, dtype=np.int64)
        previous = np.empty(heavy, dtype=np.int64)
        previous_held = 0
        weights = np.empty(width, dtype=np.float64)
        bits = np.empty(width, dtype=np.int64)
        sums = acc[g]
        for i in range(rows):
            row = logits[g, i]
            lo, hi = visible_span(row)
            total, top = count_and_top(row[lo:hi])
            counts[g, i] = total
            if total <= k:  # every visible key, most recent first
                found, _ = take_recent(row, total, ids[g, i], valid[g, i], 0)
                previous_held = 0
            else:
                # The recent window: the last recent_count visible keys, most recent first.
                found, oldest = take_recent(row, recent_count, ids[g, i], valid[g, i], 0)
                # Heavy hitters among the older visible keys: newest first, so an equal acc never displaces
                # a more recent key; best_* kept sorted by acc descending.
                floor = _heavy_floor(row, sums, oldest, previous, previous_held) if heavy > 0 else np.inf
                held = take_best_newest_first(row, sums, 0, oldest, floor, best_acc, best_id)
                found = take_ranked(best_id, held, ids[g, i], valid[g, i], found)
                previous[:held] = best_id[:held]
                previous_held = held if held == heavy else 0
            fill_invisible(row, ids[g, i], valid[g, i], found)  # where fewer than k were chosen
            if total == 0:
                continue
            # The row's softmax over its visible span, added to the accumulation (the kernel's main cost).
            scale = 1.0 / exp_shifted(row, lo, hi, top, weights, bits)
            _accumulate(weights[lo:hi], scale, sums[lo:hi])
