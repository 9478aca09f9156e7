"""The numba kernels behind `topk.row_topk` and `topk.attend_topk` on CPUs: imported only when first needed (numba
takes ~0.4 s to import).

Compiled on first use and cached beside this file (`cache=True`), so later processes load them in milliseconds.
"""

from __future__ import annotations

import numba
import numpy as np

from ._softmax_scan import exp_sum32

# Rows are cut into this many parts, each with its own scratch memory, for numba's pool to share out (a constant:
# asking numba for its thread count inside a kernel would stop the kernel being cached on disk).
PARTS = 256
BLOCK = 32  # scores per block, as in topk.py's torch rule (`_max32` takes one block as a tree of 16 lanes)


@numba.njit(inline="always")
def insert_descending(best, where, held, value, index, by_index=False):  # pragma: no cover - compiled
    """Put (value, index) into the descending list best[:held] / where[:held], behind every entry >= value (an equal
    value keeps the entries already there ahead; with `by_index`, equal values are ranked by index, the smaller
    first, whatever order they come in). The list grows until it is full, then loses its last entry (which the
    caller has checked `value` beats). Returns the new length."""
    p = held if held < best.shape[0] else best.shape[0] - 1
    while p > 0 and (best[p - 1] < value or (by_index and best[p - 1] == value and where[p - 1] > index)):
        best[p] = best[p - 1]
        where[p] = where[p - 1]
        p -= 1
    best[p] = value
    where[p] = index
    return min(held + 1, best.shape[0])


@numba.njit(inline="always")
def _max32(row, start, lanes):  # pragma: no cover - compiled
    """The largest of row[start:start + 32], halving lanes (16 wide) at each step: independent element-wise maxima
    the compiler turns into vector instructions, where a running maximum waits on itself at every score (4x
    slower)."""
    for t in range(16):
        lanes[t] = max(row[start + t], row[start + 16 + t])
    for t in range(8):
        lanes[t] = max(lanes[t], lanes[t + 8])
    for t in range(4):
        lanes[t] = max(lanes[t], lanes[t + 4])
    return max(max(lanes[0], lanes[1]), max(lanes[2], lanes[3]))


@numba.njit(inline="always")
def best_blocks_row(row, row_end, best, where, maxima, block_max, block_id, lanes):  # pragma: no cover - compiled
    """One row's k = best.shape[0] largest scores among row[:row_end] (largest first) into best / where; maxima,
    block_max, block_id and lanes are the caller's scratch (`topk_scratch`)."""
    width = row_end
    k = best.shape[0]
    block = BLOCK
    blocks = width // block
    for b in range(blocks):  # the block maxima as trees of element-wise maxima, which the compiler vectorises
        maxima[b] = _max32(row, b * block, lanes)
    for c in range(k):
        block_max[c] = -np.inf
        block_id[c] = 0
    cut = -np.inf  # block_max[k - 1], in a register between insertions
    for b in range(blocks):
        m = maxima[b]
        if m > cut:
            insert_descending(block_max, block_id, k, m, b)
            cut = block_max[k - 1]
    for j in range(k):
        best[j] = -np.inf
        where[j] = j
    # k blocks reach the k-th largest block maximum, so none of the k largest scores is below it: a score under it
    # is passed over without touching the list (which, starting empty, took every score until it filled). The
    # blocks come in decreasing maximum: once the list is full and a block's maximum does not beat its last entry,
    # no score of that block or of any later one can enter (the last, partial block is still read). `last` holds
    # best[k - 1] in a register between insertions, so the common case is two compares per score.
    floor = block_max[k - 1]
    last = -np.inf
    for c in range(k + 1):
        if c < k:
            if block_max[c] == -np.inf or block_max[c] <= last:
                continue  # (-inf, or not above a full list's last entry: so is every later block but the partial one)
            start = block_id[c] * block
            end = start + block
        else:
            start, end = blocks * block, width
        for j in range(start, end):
            v = row[j]
            if v >= floor and v > last:
                insert_descending(best, where, k, v, j)
                last = best[k - 1]
    if best[k - 1] == -np.inf:  # fewer than k finite scores: the placeholders name -inf entries, as torch.topk's do
        c = 0
        while c < k and best[c] > -np.inf:
            c += 1
        for j in range(row.shape[0]):
            if c == k:
                break
            if j >= row_end or row[j] == -np.inf:
                where[c] = j
                c += 1


@numba.njit(inline="always")
def topk_scratch(rows, k):  # pragma: no cover - compiled
    """One thread's working memory for `best_blocks_row` over rows (R, W) with top k: block maxima, the k best
    blocks' maxima and ids, and the 16 lanes of `_max32`."""
    width = rows.shape[1]
    return (
        np.empty(width // BLOCK + 1, dtype=rows.dtype), np.empty(k, dtype=rows.dtype), np.empty(k, dtype=np.int64),
        np.empty(16, dtype=rows.dtype),
    )


@numba.njit(parallel=True, cache=True, nogil=True)
def best_blocks_scan(rows, ends, values, indices):  # pragma: no cover - compiled
    """For each row r of `rows` (R, W): the k = values.shape[1] largest scores among rows[r, :ends[r]] into `values`
    (largest first) and their column ids into `indices`; the scores from ends[r] on count as -inf and are never
    read (a causal chunk's future keys need no mask).

    Each row's block maxima are taken first (one vectorised pass over the row), then only the k blocks with the
    largest maxima (and the last, partial block) are read: every one of the row's k largest scores lies in one of
    them (see topk.py). A row with fewer than k finite scores keeps -inf placeholders in the last slots, naming
    distinct -inf entries of the row (or columns from ends[r] on).
    """
    count, width = rows.shape
    k = values.shape[1]
    parts = min(count, PARTS)
    for p in numba.prange(parts):
        maxima, block_max, block_id, lanes = topk_scratch(rows, k)
        for r in range(p * count // parts, (p + 1) * count // parts):
            best_blocks_row(rows[r], ends[r], values[r], indices[r], maxima, block_max, block_id, lanes)


@numba.njit(cache=True, nogil=True)
def best_blocks_scan_serial(rows, ends, values, indices):  # pragma: no cover - compiled
    """`best_blocks_scan` on the calling thread: a decode step's few rows cost less than waking numba's pool, and
    less than the dozen small tensors of the torch rule."""
    maxima, block_max, block_id, lanes = topk_scratch(rows, values.shape[1])
    for r in range(rows.shape[0]):
        best_blocks_row(rows[r], ends[r], values[r], indices[r], maxima, block_max, block_id, lanes)


@numba.njit(inline="always")
def row_log_sum_exp(row, end, top, terms, bits):  # pragma: no cover - compiled
    """log sum exp(row[:end]) given its largest entry `top` (-inf for a row that sees nothing)."""
    if top == -np.inf:
        return -np.inf
    return top + np.log(exp_sum32(row, end, top, terms, bits))


@numba.njit(parallel=True, cache=True, nogil=True)
def best_blocks_lse_scan(rows, ends, values, indices, lse):  # pragma: no cover - compiled
    """`best_blocks_scan`, and each row's log-sum-exp over rows[r, :ends[r]] into lse (R,) float32, while the row is
    in cache: its largest score is already the first of its top-k."""
    count, width = rows.shape
    k = values.shape[1]
    parts = min(count, PARTS)
    for p in numba.prange(parts):
        maxima, block_max, block_id, lanes = topk_scratch(rows, k)
        terms, bits = np.empty(width, dtype=np.float32), np.empty(width, dtype=np.int32)
        for r in range(p * count // parts, (p + 1) * count // parts):
            best_blocks_row(rows[r], ends[r], values[r], indices[r], maxima, block_max, block_id, lanes)
            lse[r] = row_log_sum_exp(rows[r], ends[r], values[r, 0], terms, bits)


@numba.njit(cache=True, nogil=True)
def best_blocks_lse_scan_serial(rows, ends, values, indices, lse):  # pragma: no cover - compiled
    """`best_blocks_lse_scan` on the calling thread."""
    maxima, block_max, block_id, lanes = topk_scratch(rows, values.shape[1])
    terms, bits = np.empty(rows.shape[1], dtype=np.float32), np.empty(rows.shape[1], dtype=np.int32)
    for r in range(rows.shape[0]):
        best_blocks_row(rows[r], ends[r], values[r], indices[r], maxima, block_max, block_id, lanes)
        lse[r] = row_log_sum_exp(rows[r], ends[r], values[r, 0], terms, bits)


@numba.njit(fastmath={"contract"})
def _attend_row(r, scores, ids, row_group, values, exact, lse, out, error, mass):  # pragma: no cover - compiled
    k = scores.shape[1]
    dim = values.shape[2]
    top = scores[r, 0]
    for d in range(dim):
        out[r, d] = 0.0
    total = 0.0
    held = 0.0
    group = row_group[r]
    for j in range(k):
        s = scores[r, j]
        if s == -np.inf:
            continue
        w = np.exp(s - top)
        total += w
        held += np.exp(s - lse[r])
        v = values[group, ids[r, j]]
        for d in range(dim):
            out[r, d] += w * v[d]
    difference = 0.0
    norm = 0.0
    for d in range(dim):
        if total > 0.0:
            out[r, d] /= total
        delta = out[r, d] - exact[r, d]
        difference += delta * delta
        norm += exact[r, d] * exact[r, d]
    error[r] = np.sqrt(difference) / max(np.sqrt(norm), 1e-30)
    mass[r] = held


@numba.njit(parallel=True, cache=True, nogil=True)
def attend_topk(scores, ids, row_group, values, exact, lse, out, error, mass):  # pragma: no cover - compiled
    """Softmax attention over each row's top-k keys, compared with the exact attention, in one pass per row.

    scores, ids (R, k): a row's top-k scores (largest first, -inf placeholders last) and key ids; row_group (R,):
    the (batch x KV head) index of the row's values in `values` (G, K, D); exact (R, D) and lse (R,): the exact
    output and softmax log-normaliser. Writes out (R, D), the output of the softmax over the k scores (0 for a row
    that sees nothing); error (R,), ||out - exact|| / ||exact||; mass (R,), the exact softmax mass of the k keys.
    """
    for r in numba.prange(scores.shape[0]):
        _attend_row(r, scores, ids, row_group, values, exact, lse, out, error, mass)


@numba.njit(cache=True, nogil=True)
def attend_topk_serial(scores, ids, row_group, values, exact, lse, out, error, mass):  # pragma: no cover - compiled
    """`attend_topk` on the calling thread: a decode step's few rows cost less than waking numba's pool."""
    for r in range(scores.shape[0]):
        _attend_row(r, scores, ids, row_group, values, exact, lse, out, error, mass)


@numba.njit(inline="always")
def add_query(sums, head, recall, error, exact_mass, approx_mass, attended, scanned):  # pragma: no cover - compiled
    """One query's statistics added to a layer's sums (1 + 6, heads) at its head: the count first, then the fields
    in `ApproxStats.FIELDS` order. Shared by the decode-step kernels, so that order is written once."""
    sums[0, head] += 1.0
    sums[1, head] += recall
    sums[2, head] += error
    sums[3, head] += exact_mass
    sums[4, head] += approx_mass
    sums[5, head] += attended
    sums[6, head] += scanned


@numba.njit(cache=True, nogil=True)
def exact_step(rows, k, row_group, values, exact, lse, out, sums, heads, attended):  # pragma: no cover - compiled
    """A decode step of `exact_topk`, whole, on the calling thread: per row (one query of one head, rows in (batch,
    head) order) the exact top-k of rows (R, W), the softmax attention over it into out (R, D), and its statistics
    added to sums (1 + 6, heads) at the row's head: the count, then recall, error norm, exact and approximate mass
    (the same keys), attended (`attended`, the k of every visible key) and scanned (1: every key scored). As torch
    operations those are a few dozen small tensors per layer and step, which cost more than the arithmetic."""
    count, width = rows.shape
    maxima, block_max, block_id, lanes = topk_scratch(rows, k)
    scores, ids = np.empty((count, k), dtype=rows.dtype), np.empty((count, k), dtype=np.int64)
    error, mass = np.empty(count, dtype=np.float32), np.empty(count, dtype=np.float32)
    for r in range(count):
        best_blocks_row(rows[r], width, scores[r], ids[r], maxima, block_max, block_id, lanes)
        _attend_row(r, scores, ids, row_group, values, exact, lse, out, error, mass)
        found = 0
        for j in range(k):
            found += scores[r, j] > -np.inf
        add_query(sums, r % heads, found / k, error[r], mass[r], mass[r], attended, 1.0)
