"""The numba kernel behind `snapkv`'s prompt queries on CPUs: each prompt row's sliding observation window voted,
pooled and ranked in one walk down the rows, so the float64 (queries x keys) softmax, its cumulative sum, the gathers
of two of its rows per query and the pooled copy the tensor rule builds are never made. Parallel over (batch x query
head) sequences, sequential within one (a row's votes are the running sum of the rows above it).

The votes are a running float64 sum (the row entering the window added, the one leaving subtracted), where the
tensor rule takes a difference of cumulative sums: the two round differently, by ~1e-13 on votes of order 1, so they
agree except on votes equal to that precision (an equal pooled value, which max pooling makes on purpose, is the same
float in both and stays equal).
"""

from __future__ import annotations

import numba
import numpy as np

from .._softmax_scan import count_and_top, exp_shifted, visible_span
from ._pick_scan import fill_invisible, take_best_newest_first, take_ranked, take_recent


@numba.njit(fastmath={"contract", "nsz", "nnan", "ninf"})
def _pool(votes, first, end, half, kernel, average, pooled):  # pragma: no cover - compiled
    """pooled[c] for c in [first, end): the max (or the sum / kernel) of votes[c - half, c - half + kernel), clipped
    to the votes that exist (all finite and >= 0); one pass per offset over slices, which the compiler vectorises
    (indexing both arrays in one loop it does not: ~6x slower)."""
    for c in range(first, end):
        pooled[c] = 0.0
    for o in range(kernel):
        shift = o - half
        start = max(first, -shift)
        stop = min(end, votes.shape[0] - shift)
        if stop <= start:
            continue
        source = votes[start + shift : stop + shift]
        target = pooled[start:stop]
        if average:
            for c in range(stop - start):
                target[c] += source[c]
        else:
            for c in range(stop - start):
                now, other = target[c], source[c]
                target[c] = now if now > other else other
    if average:
        for c in range(first, end):
            pooled[c] /= kernel


@numba.njit(fastmath={"contract", "nsz"})
def _enter(weights, scale, ring_row, running):  # pragma: no cover - compiled
    """A row's softmax (weights x scale) into its ring slot and the running sum (slices: vectorised)."""
    for j in range(weights.shape[0]):
        p = weights[j] * scale
        ring_row[j] = p
        running[j] += p


@numba.njit(fastmath={"contract", "nsz"})
def _votes(row, running, votes):  # pragma: no cover - compiled
    """votes = the running sum on visible keys (>= 0 whatever its rounding), 0 elsewhere (slices: vectorised)."""
    for c in range(row.shape[0]):
        total = running[c] if running[c] > 0.0 else 0.0
        votes[c] = total if row[c] > -np.inf else 0.0


@numba.njit(parallel=True, cache=True, nogil=True, fastmath={"contract"})
def snapkv_prompt(logits, earlier, window, kernel, average, ids, valid, counts, tail):  # pragma: no cover - compiled
    """For each sequence g and prompt row i of logits (G, Q, K) float32 (-inf: a key the row cannot see):

    * counts[g, i] = the visible keys;
    * the row's window: w = min(visible keys, window, rows so far), the rows so far being the T rows of earlier
      (G, T, K) float64 (softmax rows of the prompt queries just before this chunk) and the chunk's rows up to i;
    * votes = the sum of the last w softmax rows; a key's pooled vote = the max (average=False) or the sum / kernel
      (average=True) of the votes of keys [j - kernel // 2, j - kernel // 2 + kernel) where only prefix keys
      (visible, older than the row's last w visible keys) vote;
    * ids[g, i] (k = ids.shape[2]) = the row's last w visible keys (most recent first), then the k - w prefix keys of
      largest pooled vote (ties to the more recent), then invisible keys, most recent first, where fewer are chosen;
      valid[g, i] marks the chosen ones. Order: as `_cache_common.pick` ranks the tensor rule's composite;
    * tail[g] (N, K) = the last N of the T + Q softmax rows (the next chunk's `earlier`), N < window.

    The last `window` rows live in a ring with the span of keys each covers, and their running sum is updated by
    the row that enters and the one that leaves, over those spans only: a causal row costs its visible keys, not K.
    """
    groups, rows, width = logits.shape
    before = earlier.shape[1]
    k = ids.shape[2]
    kept = tail.shape[1]
    total_rows = before + rows
    half = kernel // 2
    for g in numba.prange(groups):
        ring = np.zeros((window, width), dtype=np.float64)  # row n in slot n % window, valid on [span_lo, span_hi)
        span_lo = np.zeros(window, dtype=np.int64)
        span_hi = np.zeros(window, dtype=np.int64)
        running = np.zeros(width, dtype=np.float64)  # the sum of the ring's rows
        probs = np.empty(width, dtype=np.float64)
        bits = np.empty(width, dtype=np.int64)
        votes = np.zeros(width, dtype=np.float64)
        pooled = np.zeros(width, dtype=np.float64)
        best = np.empty(k, dtype=np.float64)
        best_id = np.empty(k, dtype=np.int64)
        for n in range(total_rows):
            slot = n % window
            if n >= window:  # the row leaving the ring leaves the sum
                for j in range(span_lo[slot], span_hi[slot]):
                    running[j] -= ring[slot, j]
            if n < before:
                lo, hi = 0, width
                for j in range(width):
                    ring[slot, j] = earlier[g, n, j]
                    running[j] += earlier[g, n, j]
                span_lo[slot], span_hi[slot] = lo, hi
                continue
            i = n - before
            row = logits[g, i]
            lo, hi = visible_span(row)
            span_lo[slot], span_hi[slot] = lo, hi
            visible, top = count_and_top(row[lo:hi])
            counts[g, i] = visible
            if visible > 0:
                scale = 1.0 / exp_shifted(row, lo, hi, top, probs, bits)
                _enter(probs[lo:hi], scale, ring[slot, lo:hi], running[lo:hi])
            w = min(visible, window, n + 1)
            # The window: the last w visible keys, most recent first; the visible keys in [lo, prefix_end) are the
            # prefix.
            found, prefix_end = take_recent(row[:hi], w, ids[g, i], valid[g, i], 0)
            wanted = k - found
            if wanted > 0 and prefix_end > lo:
                first = max(lo - half, 0)
                reach = min(width, prefix_end + half)  # votes past it (window and invisible keys) are 0
                _votes(row[first:prefix_end], running[first:prefix_end], votes[first:prefix_end])
                votes[prefix_end:reach] = 0.0
                for older in range(n + 1 - min(n + 1, window), n + 1 - w):  # ring rows older than the window
                    back = older % window
                    for c in range(max(lo, span_lo[back]), min(prefix_end, span_hi[back])):
                        if row[c] > -np.inf:
                            votes[c] = max(votes[c] - ring[back, c], 0.0)
                _pool(votes[:reach], lo, prefix_end, half, kernel, average, pooled)
                # newest first: an equal vote never displaces a newer key
                held = take_best_newest_first(row, pooled, lo, prefix_end, -np.inf, best[:wanted], best_id[:wanted])
                found = take_ranked(best_id, held, ids[g, i], valid[g, i], found)
            fill_invisible(row, ids[g, i], valid[g, i], found)  # where fewer than k were chosen
        for m in range(kept):
            n = total_rows - kept + m
            slot = n % window
            tail[g, m, :] = 0.0
            for j in range(span_lo[slot], span_hi[slot]):
                tail[g, m, j] = ring[slot, j]
