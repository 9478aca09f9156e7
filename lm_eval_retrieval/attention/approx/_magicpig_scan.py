"""The numba kernels behind `magicpig` on CPUs: each query's static keys, its sampled candidates, and the
self-normalised estimate over them, one row at a time, so no (queries x keys) tensor is ever written; the sampling
probability and the importance weight are computed only for the keys that collide.

A query finds its colliding keys either by comparing its code with every candidate's, table by table (a decode
step's few rows), or, for a prompt's many rows, as the authors' hash tables do: each table's keys grouped by code
(`bucket_order`), and only the keys in the query's bucket visited (a bucket holds about K / 2^bits keys, against K
compared).

Compiled on first use and cached beside this file (`cache=True`).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .._softmax_scan import exp_shifted
from ._simhash_scan import row_extent


@numba.njit(cache=True, nogil=True)
def pack_key_codes(projections, bits, codes, start):  # pragma: no cover - compiled
    """codes[g, t, start + i] = the packed signs of projections[g, i, t*bits : (t+1)*bits]: each (batch x KV head)
    group's keys hashed into their tables, laid out table by table so that a query's comparisons run along the
    keys."""
    tables = codes.shape[1]
    packed = np.empty(tables, dtype=codes.dtype)
    for g in range(projections.shape[0]):
        for i in range(projections.shape[1]):
            pack_codes(projections[g, i], bits, packed)
            for t in range(tables):
                codes[g, t, start + i] = packed[t]


@numba.njit(inline="always")
def pack_codes(projections, bits, codes):  # pragma: no cover - compiled
    """codes[t] = table t's code: bit b set where projection t*bits + b is positive. Bit by bit across all tables
    (a loop the compiler runs several tables at a time, without a branch), twice as fast as table by table."""
    for t in range(codes.shape[0]):
        codes[t] = 0
    for b in range(bits):
        for t in range(codes.shape[0]):
            codes[t] |= np.int64(projections[t * bits + b] > 0) << b


@numba.njit(fastmath={"contract", "reassoc", "nsz"})
def _dot(query, r, keys, g, j):  # pragma: no cover - compiled
    """query[r] . keys[g, j] (float32, summed in any order as a matmul does); the score and the cosine both use it."""
    s = np.float32(0.0)
    for d in range(query.shape[1]):
        s += query[r, d] * keys[g, j, d]
    return s


@numba.njit
def sampling_probability(cosine, bits, tables, least, log_choose):  # pragma: no cover - compiled
    """P(Binomial(tables, u^bits) >= least), u = 1 - arccos(cosine)/pi, as `magicpig.collision_probability`;
    log_choose[c] = log C(tables, c)."""
    agree = 1.0 - math.acos(min(1.0, max(-1.0, cosine))) / math.pi
    hit = agree**bits
    below = 0.0
    if hit >= 1.0:
        below = 1.0 if least > tables else 0.0  # every table collides: fewer than `least` only if least > tables
    else:
        log_miss = math.log1p(-hit)
        for count in range(min(least, tables + 1)):
            below += math.exp(log_choose[count] + (tables - count) * log_miss) * hit**count
    return min(1.0, max(0.0, 1.0 - below))


@numba.njit(inline="always")
def _score(query, r, keys, g, j, scores, scaling, softcap):  # pragma: no cover - compiled
    """The exact (scaled, soft-capped) score of row r and key j: read from the probe's scores of the chunk where
    the caller has them (scores (R, >= K), else (R, 0)), else a dot product."""
    if scores.shape[1]:
        return np.float64(scores[r, j])
    s = np.float64(_dot(query, r, keys, g, j)) * scaling
    if softcap > 0.0:
        s = softcap * math.tanh(s / softcap)
    return s


@numba.njit(cache=True, nogil=True)
def bucket_order(codes, length, order, offsets):  # pragma: no cover - compiled
    """The authors' hash tables, as a counting sort: order[g, t] (G, tables, length) int32 holds table t's first
    `length` keys grouped by code, in key order within a code; their bucket for code c is order[g, t,
    offsets[g, t, c] : offsets[g, t, c + 1]] (offsets (G, tables, 2^bits + 1) int32)."""
    buckets = offsets.shape[2] - 1
    for g in range(codes.shape[0]):
        for t in range(codes.shape[1]):
            start = offsets[g, t]
            for c in range(buckets + 1):
                start[c] = 0
            for j in range(length):
                start[codes[g, t, j] + 1] += 1
            for c in range(buckets):
                start[c + 1] += start[c]
            for j in range(length):  # start[c] runs ahead while code c's keys are placed, then is set back
                c = codes[g, t, j]
                order[g, t, start[c]] = j
                start[c] += 1
            for c in range(buckets, 0, -1):
                start[c] = start[c - 1]
            start[0] = 0


@numba.njit(inline="always")
def _collide_by_buckets(codes, order, offsets, groups, bounds, least, visible, row_mask, hits, sampled, found):  # pragma: no cover
    """For a block of rows: the candidates of each (its visible keys in [bounds[i, 0], bounds[i, 1])) whose code
    equals the row's in >= least tables, into sampled[i, :found[i]]. Visits only the keys of the row's bucket in
    each table (in key order, so a bucket's walk stops at the first key past the candidates), table by table for
    the whole block, so that a table's buckets are read once per block rather than once per row; hits (block, K)
    counts the collisions and is all zeros before and after."""
    rows = bounds.shape[0]
    for t in range(codes.shape[1]):
        for i in range(rows):
            lo, hi, dense = bounds[i, 0], bounds[i, 1], bounds[i, 3]
            g, code = groups[i], codes[i, t]
            for k in range(offsets[g, t, code], offsets[g, t, code + 1]):
                j = order[g, t, k]
                if j >= hi:
                    break
                if j >= lo and (dense or visible[row_mask[i], j]):
                    count = hits[i, j] + 1
                    hits[i, j] = count
                    if count == least:
                        sampled[i, found[i]] = j
                        found[i] += 1
    for i in range(rows):
        hits[i, bounds[i, 0] : bounds[i, 1]] = 0


@numba.njit(inline="always")
def _collide_by_scan(code, key_codes, g, row, dense, lo, hi, least, hits, sampled):  # pragma: no cover
    """As `_collide_by_buckets` for one row, comparing its code with every candidate's: one pass along the keys per
    table, many keys per vector instruction (counting key by key, with a sum across its tables, was 4x slower).
    Returns how many it sampled."""
    span = hi - lo
    for j in range(span):
        hits[j] = 0
    for t in range(code.shape[0]):
        table_code = code[t]
        column = key_codes[g, t]
        for j in range(span):
            hits[j] += column[lo + j] == table_code
    found = 0
    for j in range(span):
        if hits[j] >= least and (dense or row[lo + j]):
            sampled[found] = lo + j
            found += 1
    for j in range(span):
        hits[j] = 0
    return found


@numba.njit(inline="always")
def _bounds(row, count, end, sinks, window, out):  # pragma: no cover - compiled
    """out = (sink_end, win_start, candidates, dense, placeholder): the row's static keys are its visible keys
    before sink_end and from win_start to its end; its candidates the visible keys between; dense where every key
    before the end is visible (a causal row without padding: no mask to read); placeholder its first invisible key
    (-1 if none)."""
    if count == end:
        sink_end = min(sinks, end)
        win_start = max(end - window, sink_end)
        out[0], out[1], out[2], out[3] = sink_end, win_start, win_start - sink_end, 1
        out[4] = end if end < row.shape[0] else -1
        return
    sink_end, taken = 0, 0
    while taken < sinks and sink_end < end:
        taken += row[sink_end]
        sink_end += 1
    win_start, taken = end, 0
    while taken < window and win_start > sink_end:
        win_start -= 1
        taken += row[win_start]
    seen = 0
    for j in range(sink_end, win_start):
        seen += row[j]
    out[0], out[1], out[2], out[3], out[4] = sink_end, win_start, seen, 0, -1
    for j in range(row.shape[0]):
        if not row[j]:
            out[4] = j
            return


@numba.njit(fastmath={"contract"})
def _finish_row(
    r, query, centre, keys, key_norms, values, g, row, end, bounds, sampled, found, least, log_choose, bits, tables,
    scaling, softcap, floor, chosen, chosen_count, candidates, filler, scores, logw, weights, exp_bits, acc, out,
):  # pragma: no cover - compiled
    """Row r's static keys and its `found` sampled ones, with their weights, into chosen and the estimate into
    out (see `magicpig_attend`)."""
    sink_end, win_start, dense = bounds[0], bounds[1], bounds[3]
    q_norm, q_centre = 0.0, 0.0
    if found:
        for d in range(query.shape[1]):
            q_norm += np.float64(query[r, d]) * query[r, d]
            q_centre += np.float64(query[r, d]) * centre[g, d]
        q_norm = math.sqrt(q_norm)
    n = 0
    for j in range(sink_end):
        if dense or row[j]:
            chosen[r, n], logw[n] = j, _score(query, r, keys, g, j, scores, scaling, softcap)
            n += 1
    for i in range(found):
        j = sampled[i]
        score = _score(query, r, keys, g, j, scores, scaling, softcap)
        dot = score / scaling if scores.shape[1] else _dot(query, r, keys, g, j)  # shared scores: no soft-capping
        cosine = (dot - q_centre) / max(q_norm * key_norms[g, j], 1e-300)
        p = sampling_probability(cosine, bits, tables, least, log_choose)
        chosen[r, n], logw[n] = j, score - math.log(p + floor)
        n += 1
    for j in range(win_start, end):
        if dense or row[j]:
            chosen[r, n], logw[n] = j, _score(query, r, keys, g, j, scores, scaling, softcap)
            n += 1
    chosen_count[r], candidates[r] = n, bounds[2]
    filler[r] = bounds[4] if bounds[4] >= 0 else (chosen[r, 0] if n > 0 else 0)
    _estimate_row(r, chosen[r], n, logw, weights, exp_bits, values, g, acc, out)


@numba.njit(fastmath={"contract"})
def _estimate_row(r, picked, n, logw, weights, exp_bits, values, g, acc, out):  # pragma: no cover - compiled
    """out[r] = sum_c w_c v_c / sum_c w_c with w_c = exp(logw[c]): the self-normalised estimate (0 if nothing has
    weight, as the tensor path's nan_to_num)."""
    value_dim = values.shape[2]
    top = -np.inf
    for c in range(n):
        top = max(top, logw[c])
    if top == -np.inf:
        for d in range(value_dim):
            out[r, d] = 0.0
        return
    total = exp_shifted(logw, 0, n, top, weights, exp_bits)
    for d in range(value_dim):
        acc[d] = 0.0
    for c in range(n):
        w = weights[c]
        j = picked[c]
        for d in range(value_dim):
            acc[d] += w * values[g, j, d]
    for d in range(value_dim):
        out[r, d] = acc[d] / total


BLOCK_ROWS = 16  # rows whose bucket walks go table by table together


@numba.njit
def _sample_rows(
    first, stop, query, query_proj, centre, key_codes, order, offsets, keys, key_norms, values, row_group, visible,
    row_mask, counts, row_end, sinks, window, least, log_choose, bits, scaling, softcap, floor, hit_kind, chosen,
    chosen_count, candidates, filler, scores, out,
):  # pragma: no cover - compiled
    """Rows first..stop-1 of `magicpig_attend`, a block of BLOCK_ROWS at a time, with one thread's working memory:
    the block's codes, bounds, groups, collision counts and sampled keys; a row's log-weights, weights and sum."""
    tables, key_len = key_codes.shape[1], visible.shape[1]
    codes = np.empty((BLOCK_ROWS, tables), dtype=key_codes.dtype)
    bounds = np.empty((BLOCK_ROWS, 5), dtype=np.int64)
    groups, masks = np.empty(BLOCK_ROWS, dtype=np.int64), np.empty(BLOCK_ROWS, dtype=np.int64)
    found = np.empty(BLOCK_ROWS, dtype=np.int64)
    hits = np.zeros((BLOCK_ROWS, key_len), dtype=hit_kind.dtype)
    sampled = np.empty((BLOCK_ROWS, key_len), dtype=np.int64)
    logw, weights = np.empty(key_len, dtype=np.float64), np.empty(key_len, dtype=np.float64)
    exp_bits, acc = np.empty(key_len, dtype=np.int64), np.empty(values.shape[2], dtype=np.float64)
    for block in range(first, stop, BLOCK_ROWS):
        rows = min(BLOCK_ROWS, stop - block)
        for i in range(rows):
            r = block + i
            m = row_mask[r]
            groups[i], masks[i], found[i] = row_group[r], m, 0
            _bounds(visible[m], counts[m], row_end[m], sinks, window, bounds[i])
            pack_codes(query_proj[r], bits, codes[i])
        if least <= 0:  # every candidate is sampled
            for i in range(rows):
                row = visible[masks[i]]
                for j in range(bounds[i, 0], bounds[i, 1]):
                    if bounds[i, 3] or row[j]:
                        sampled[i, found[i]] = j
                        found[i] += 1
        elif order.shape[2] > 0:
            _collide_by_buckets(codes[:rows], order, offsets, groups, bounds[:rows], least, visible, masks, hits,
                                sampled, found)  # fmt: skip
        else:
            for i in range(rows):
                found[i] = _collide_by_scan(codes[i], key_codes, groups[i], visible[masks[i]], bounds[i, 3],
                                            bounds[i, 0], bounds[i, 1], least, hits[0], sampled[i])  # fmt: skip
        for i in range(rows):
            r = block + i
            _finish_row(
                r, query, centre, keys, key_norms, values, groups[i], visible[masks[i]], row_end[masks[i]], bounds[i],
                sampled[i], found[i], least, log_choose, bits, tables, scaling, softcap, floor, chosen, chosen_count,
                candidates, filler, scores, logw, weights, exp_bits, acc, out,
            )  # fmt: skip


@numba.njit(parallel=True, cache=True, nogil=True)
def magicpig_attend(
    query, query_proj, centre, key_codes, order, offsets, keys, key_norms, values, row_group, visible, row_mask,
    counts, row_end, sinks, window, least, log_choose, bits, scaling, softcap, floor, hit_kind, chosen,
    chosen_count, candidates, filler, scores, out, parts,
):  # pragma: no cover - compiled
    """For each row r (a query of one head, R rows): its first `sinks` and last `window` visible keys, and each
    other visible key ("candidate") whose code equals the row's in at least `least` tables, into chosen[r, :n]
    (chosen_count[r] = n); the importance-weighted softmax over them into out[r]; its candidates into candidates[r]
    and a placeholder id (its first invisible key, else its first chosen one) into filler[r].

    query (R, D) float32 and query_proj (R, tables x bits) float32: its projections on the hyperplanes, whose
    signs are its codes; centre (G, D) float64: each group's key centre; key_codes (G, tables, >= K)
    (`pack_key_codes`); order and offsets: the hash tables' buckets (`bucket_order`; order (G, tables, 0): compare
    every candidate instead); key_norms (G, >= K) float64: each key's centred norm; keys and values (G, K, D)
    float32; row_group (R,): the row's (batch x KV head) group; visible (M, K) bool and row_mask (R,): the row's
    mask row; counts and row_end (M,) int64, written first (see `_simhash_scan.row_extent`); log_choose (least,)
    float64: log C(tables, c); hit_kind: an array whose integer type counts collisions (int8 up to 127 tables);
    chosen (R, >= K) int32; scores (R, >= K) float32: the probe's exact scores of the chunk where there is no
    soft-capping (a key's score is read, and its dot product is score / scaling), else (R, 0): dot products.
    parts: how many pieces the rows are cut into, a few per thread: each piece allocates its working memory (a
    block's collision counts and sampled keys, up to hundreds of KB, which the allocator maps afresh each time),
    and several per thread still even out rows of different lengths."""
    for m in numba.prange(visible.shape[0]):
        row_extent(visible, counts, row_end, m)
    rows = out.shape[0]
    parts = min(rows, parts)
    for p in numba.prange(parts):
        _sample_rows(
            p * rows // parts, (p + 1) * rows // parts, query, query_proj, centre, key_codes, order, offsets, keys,
            key_norms, values, row_group, visible, row_mask, counts, row_end, sinks, window, least, log_choose, bits,
            scaling, softcap, floor, hit_kind, chosen, chosen_count, candidates, filler, scores, out,
        )  # fmt: skip


@numba.njit(cache=True, nogil=True)
def magicpig_attend_serial(
    query, query_proj, centre, key_codes, order, offsets, keys, key_norms, values, row_group, visible, row_mask,
    counts, row_end, sinks, window, least, log_choose, bits, scaling, softcap, floor, hit_kind, chosen,
    chosen_count, candidates, filler, scores, out, parts,
):  # pragma: no cover - compiled
    """`magicpig_attend` on the calling thread: a decode step's few rows cost less than waking numba's pool."""
    for m in range(visible.shape[0]):
        row_extent(visible, counts, row_end, m)
    _sample_rows(
        0, out.shape[0], query, query_proj, centre, key_codes, order, offsets, keys, key_norms, values, row_group,
        visible, row_mask, counts, row_end, sinks, window, least, log_choose, bits, scaling, softcap, floor,
        hit_kind, chosen, chosen_count, candidates, filler, scores, out,
    )  # fmt: skip


@numba.njit(parallel=True, cache=True, nogil=True)
def padded_ids(chosen, chosen_count, filler, ids):  # pragma: no cover - compiled
    """ids[r] = row r's chosen ids (chosen[r, :chosen_count[r]]), then its placeholder filler[r] to the width."""
    for r in numba.prange(ids.shape[0]):
        n = min(chosen_count[r], ids.shape[1])
        for c in range(n):
            ids[r, c] = chosen[r, c]
        for c in range(n, ids.shape[1]):
            ids[r, c] = filler[r]
