"""The numba kernel behind `set_metrics.id_set_metrics` on CPUs: an approximation's key ids against the exact
top-k, one row at a time, instead of a dozen small tensor operations per call (which, at one query per head in a
decode step, cost more than the arithmetic).

Two drivers share the row: a parallel one for prefill chunks, and a serial one for the few rows of a decode step,
where waking a second thread pool beside torch's costs more than the rows.
"""

from __future__ import annotations

import numba
import numpy as np

from ._topk_scan import PARTS, add_query, best_blocks_row, topk_scratch


@numba.njit(fastmath={"contract"})
def _row(
    r, logits, lse, exact_scores, exact_ids, approx_ids, row_limit, mask, row_mask, approx_out, exact_out,
    hits, mass, used, error, exact_mass, marks,
):  # pragma: no cover - compiled
    k = exact_ids.shape[1]
    width = logits.shape[1]
    # marks[i] == in_exact: key i is one of the row's exact top-k; == seen: the row's approximate ids named it
    # already. Both are unique to the row (r only grows within a thread), so the array is never cleared.
    in_exact, seen = 2 * r + 1, 2 * r + 2
    held = 0.0
    for j in range(k):
        if exact_scores[r, j] > -np.inf:
            held += np.exp(exact_scores[r, j] - lse[r])
            marks[exact_ids[r, j]] = in_exact
    exact_mass[r] = held
    limit = row_limit[r]
    row = row_mask[r]
    hit, count, picked = 0, 0, 0.0
    for j in range(approx_ids.shape[1]):
        i = approx_ids[r, j]
        if i < 0 or i > limit or i >= width or marks[i] == seen:  # a key the row cannot see, or a repeat
            continue
        if row >= 0 and not mask[row, i]:
            continue
        hit += marks[i] == in_exact
        marks[i] = seen
        count += 1
        picked += np.exp(logits[r, i] - lse[r])
    hits[r], mass[r], used[r] = hit, picked, count
    difference, norm = 0.0, 0.0
    for d in range(exact_out.shape[1]):
        delta = approx_out[r, d] - exact_out[r, d]
        difference += delta * delta
        norm += exact_out[r, d] * exact_out[r, d]
    error[r] = np.sqrt(difference) / max(np.sqrt(norm), 1e-30)


@numba.njit(parallel=True, cache=True, nogil=True)
def id_set_metrics(
    logits, lse, exact_scores, exact_ids, approx_ids, row_limit, mask, row_mask, approx_out, exact_out,
    hits, mass, used, error, exact_mass,
):  # pragma: no cover - compiled
    """Per row r: hits[r], the distinct visible approximate ids among the exact top-k (placeholders with score -inf
    are not in it); mass[r], their exact softmax mass; used[r], how many there are; error[r],
    ||approx_out - exact_out|| / ||exact_out||; exact_mass[r], the mass of the exact top-k.

    logits (R, W): the row's exact scores; lse (R,) their log-normaliser; a key id i is visible to row r when
    0 <= i <= row_limit[r], i < W, and, where row_mask[r] >= 0, mask[row_mask[r], i].
    """
    rows = logits.shape[0]
    parts = min(rows, PARTS)
    for p in numba.prange(parts):
        marks = np.zeros(logits.shape[1], dtype=np.int64)
        for r in range(p * rows // parts, (p + 1) * rows // parts):
            _row(
                r, logits, lse, exact_scores, exact_ids, approx_ids, row_limit, mask, row_mask, approx_out,
                exact_out, hits, mass, used, error, exact_mass, marks,
            )  # fmt: skip


@numba.njit(cache=True, nogil=True)
def id_set_metrics_serial(
    logits, lse, exact_scores, exact_ids, approx_ids, row_limit, mask, row_mask, approx_out, exact_out,
    hits, mass, used, error, exact_mass,
):  # pragma: no cover - compiled
    """`id_set_metrics` on the calling thread."""
    marks = np.zeros(logits.shape[1], dtype=np.int64)
    for r in range(logits.shape[0]):
        _row(
            r, logits, lse, exact_scores, exact_ids, approx_ids, row_limit, mask, row_mask, approx_out, exact_out,
            hits, mass, used, error, exact_mass, marks,
        )  # fmt: skip


@numba.njit(cache=True, nogil=True)
def id_set_step(
    logits, k, lse, approx_ids, row_limit, approx_out, exact_out, scanned, denominator, keys_seen, sums, heads,
):  # pragma: no cover - compiled
    """A decode step of an approximation, measured whole on the calling thread. Per row (one query of one head,
    rows in (batch, head) order): the exact top-k of logits (R, W) by the blocked rule of `_topk_scan`, then the
    row's approximate ids against it as `id_set_metrics` measures them (keys up to row_limit[r] visible), added to
    sums (1 + 6, heads) at the row's head: the count, recall (hits / denominator), error norm, exact and
    approximate mass, attended (ids used / keys_seen) and scanned (scanned[r] / keys_seen, NaN where the method
    reported nothing). As torch operations that is a few dozen small tensors per layer and step."""
    count, width = logits.shape
    maxima, block_max, block_id, lanes = topk_scratch(logits, k)
    exact_scores, exact_ids = np.empty((count, k), dtype=logits.dtype), np.empty((count, k), dtype=np.int64)
    hits, used = np.empty(count, dtype=np.int64), np.empty(count, dtype=np.int64)
    mass, error, exact_mass = np.empty(count), np.empty(count), np.empty(count)
    marks = np.zeros(width, dtype=np.int64)
    mask, row_mask = np.zeros((1, 1), dtype=np.bool_), np.full(count, -1)
    for r in range(count):
        best_blocks_row(logits[r], width, exact_scores[r], exact_ids[r], maxima, block_max, block_id, lanes)
        _row(
            r, logits, lse, exact_scores, exact_ids, approx_ids, row_limit, mask, row_mask, approx_out, exact_out,
            hits, mass, used, error, exact_mass, marks,
        )  # fmt: skip
        add_query(
            sums, r % heads, hits[r] / denominator, error[r], exact_mass[r], mass[r], used[r] / keys_seen,
            scanned[r] / keys_seen,
        )  # fmt: skip
