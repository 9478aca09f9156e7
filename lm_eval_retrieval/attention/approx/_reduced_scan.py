"""The numba kernel behind `sparq` and `loki` on a plainly causal chunk on CPUs: each row's scores from a few
components (SparQ: the query's r largest; Loki: r principal directions), and their top-k (and log-normaliser) taken
while the row is in cache.

Written as a (queries x keys) matrix first, these scores cost a matmul whose output is as large as the exact one
(for SparQ a full-width one: the zeroed components multiply too) and a pass of the top-k kernel over memory, as much
as the probe's own exact analysis. Here each row's components pick rows of the transposed keys, whose weighted sum
lands in a buffer that stays in cache for the top-k; the keys after the row's own are never read.

Compiled on first use and cached beside this file (`cache=True`).
"""

from __future__ import annotations

import numba
import numpy as np

from .._topk_scan import PARTS, best_blocks_row, insert_descending, row_log_sum_exp, topk_scratch


@numba.njit(fastmath={"contract"})
def _reduced_scores(weights, dims, components, end, softcap, out):  # pragma: no cover - compiled
    """out[:end] = sum_i weights[i] * components[dims[i], :end], soft-capped where softcap > 0."""
    for j in range(end):
        out[j] = 0.0
    for i in range(weights.shape[0]):
        row = components[dims[i]]
        weight = weights[i]
        for j in range(end):
            out[j] += weight * row[j]
    if softcap > 0:
        for j in range(end):
            out[j] = softcap * np.tanh(out[j] / softcap)


@numba.njit(inline="always")
def _scratch(width, k):  # pragma: no cover - compiled
    """One thread's working memory: the row's scores, the top-k's and the log-normaliser's scratch."""
    row = np.empty(width, dtype=np.float32)
    maxima, block_max, block_id, lanes = topk_scratch(row.reshape(1, width), k)
    return row, maxima, block_max, block_id, lanes, np.empty(width, dtype=np.float32), np.empty(width, dtype=np.int32)


@numba.njit(inline="always")
def _select_row(
    r, weights, dims, row_group, components, ends, softcap, values, indices, lse, scratch
):  # pragma: no cover - compiled
    row, maxima, block_max, block_id, lanes, terms, bits = scratch
    end = ends[r]
    _reduced_scores(weights[r], dims[r], components[row_group[r]], end, softcap, row)
    best_blocks_row(row, end, values[r], indices[r], maxima, block_max, block_id, lanes)
    if lse.shape[0]:
        lse[r] = row_log_sum_exp(row, end, values[r, 0], terms, bits)


@numba.njit(parallel=True, cache=True, nogil=True)
def reduced_select(
    weights, dims, row_group, components, ends, softcap, values, indices, lse
):  # pragma: no cover - compiled
    """For each row r (a query of one head): its scores against keys 0 .. ends[r] - 1 of its group,
    sum_i weights[r, i] * components[row_group[r], dims[r, i], j] (soft-capped where softcap > 0), their k =
    values.shape[1] largest (largest first) into values / indices as `_topk_scan.best_blocks_scan` takes them, and,
    where lse is (R,) rather than empty, their log-sum-exp.

    weights (R, r) float32 and dims (R, r) int64: each row's components and their weights; components (G, C, K)
    float32: the keys (or their projections) transposed, one row per component; ends (R,) int64."""
    rows = values.shape[0]
    parts = min(rows, PARTS)
    for p in numba.prange(parts):
        scratch = _scratch(components.shape[2], values.shape[1])
        for r in range(p * rows // parts, (p + 1) * rows // parts):
            _select_row(r, weights, dims, row_group, components, ends, softcap, values, indices, lse, scratch)


@numba.njit(cache=True, nogil=True)
def reduced_select_serial(
    weights, dims, row_group, components, ends, softcap, values, indices, lse
):  # pragma: no cover - compiled
    """`reduced_select` on the calling thread: a decode step's few rows cost less than waking numba's pool."""
    scratch = _scratch(components.shape[2], values.shape[1])
    for r in range(values.shape[0]):
        _select_row(r, weights, dims, row_group, components, ends, softcap, values, indices, lse, scratch)


@numba.njit(cache=True, nogil=True)
def largest_components(query, scaling, weights, dims):  # pragma: no cover - compiled
    """SparQ's components for `reduced_select`: for each row of query (R, D) float32, its r = dims.shape[1]
    components of largest magnitude (the first of equal ones) into dims, largest first, and into weights each
    component times scaling / sqrt(|q_r|_1 / |q|_1), the paper's temperature with the model's scaling. One pass on
    the calling thread: a row is D numbers."""
    rank = dims.shape[1]
    magnitudes = np.empty(rank, dtype=np.float32)
    for r in range(query.shape[0]):
        row = query[r]
        total = np.float32(0.0)
        for i in range(rank):
            magnitudes[i] = -np.inf
            dims[r, i] = 0
        for d in range(row.shape[0]):
            magnitude = abs(row[d])
            total += magnitude
            if magnitude > magnitudes[rank - 1]:
                insert_descending(magnitudes, dims[r], rank, magnitude, d)
        kept = np.float32(0.0)
        for i in range(rank):
            kept += magnitudes[i]
        share = kept / max(total, np.float32(1e-30))
        factor = np.float32(scaling) / np.sqrt(max(share, np.float32(1e-30)))
        for i in range(rank):
            weights[r, i] = row[dims[r, i]] * factor
