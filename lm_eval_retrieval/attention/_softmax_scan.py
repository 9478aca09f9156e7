"""Softmax rows inside numba kernels, for the methods whose cost is one exact softmax per (query, key): `h2o`
(attention accumulated over every query) and `snapkv` (votes of the observation window).

Each piece is a straight loop the compiler runs several elements at a time; written naively (a max with NaN rules,
a call to exp per element) each costs several times more, and these loops are the kernels' main cost.

The exp: numba calls libm's scalar `exp` once per element (no SVML on most machines), ~6 ns; this one is a
Cody-Waite range reduction, a degree-13 Taylor polynomial and an exponent written as integer bits, in two loops without calls that the
compiler runs several elements at a time (~2 ns), within 1e-14 of libm's value (a test holds it to that).
"""

from __future__ import annotations

import numba
import numpy as np

LOG2E = 1.4426950408889634
LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that k * LN2_HI is exact for the k used here
LN2_LO = 1.90821492927058770002e-10
ROUND = 6755399441055744.0  # 1.5 * 2**52: adding and subtracting it rounds a double to the nearest integer
LOWEST = -708.0  # below, 2**k is no longer a normal double: the result is taken as 0
# The same in float32 (Cephes' expf: a degree-6 polynomial, about 1 ulp), for sums that only need float32's precision.
LOG2E_32 = np.float32(LOG2E)
LN2_HI_32 = np.float32(0.693359375)
LN2_LO_32 = np.float32(-2.12194440e-4)
ROUND_32 = np.float32(12582912.0)  # 1.5 * 2**23
LOWEST_32 = np.float32(-87.0)


@numba.njit(inline="always")
def visible_span(row):  # pragma: no cover - compiled
    """(first visible key, one past the last) of a float32 logits row (-inf: invisible); (0, 0) if none is."""
    hi = row.shape[0]
    while hi > 0 and not row[hi - 1] > -np.inf:
        hi -= 1
    lo = 0
    while lo < hi and not row[lo] > -np.inf:
        lo += 1
    return lo, hi


@numba.njit(fastmath={"nnan", "nsz"})
def count_and_top(row):  # pragma: no cover - compiled
    """(visible keys, largest logit as float64) of a float32 logits slice (-inf: invisible); two reductions the
    compiler vectorises (scores are never NaN: the flag lets it use the CPU's max)."""
    count = 0
    top = np.float32(-np.inf)
    for j in range(row.shape[0]):
        value = row[j]
        count += value > -np.inf
        top = value if value > top else top
    return count, np.float64(top)


@numba.njit(fastmath={"contract", "nsz", "arcp"})
def exp_shifted(row, lo, hi, top, out, bits):  # pragma: no cover - compiled
    """out[j] = exp(row[j] - top) in float64 for j in [lo, hi) (0 where row[j] - top < -708, -inf included);
    returns their sum. `bits` is int64 scratch as long as `out`. No reassociation is allowed (fastmath flags above),
    which would undo the range reduction."""
    for j in range(lo, hi):
        x = max(np.float64(row[j]) - top, LOWEST)
        k = (x * LOG2E + ROUND) - ROUND
        r = (x - k * LN2_HI) - k * LN2_LO
        p = 1.0 / 6227020800.0
        p = p * r + 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
        p = p * r + 1.0 / 5040.0
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        out[j] = p * r + 1.0
        bits[j] = (np.int64(k) + 1023) << 52
    return _scaled_sum(row[lo:hi], top, out[lo:hi], bits.view(np.float64)[lo:hi])


@numba.njit(fastmath={"reassoc", "contract", "nsz", "arcp"})  # not "ninf": -inf is an input
def _scaled_sum(row, top, out, scale):  # pragma: no cover - compiled
    """out *= scale (0 below exp(-708)); returns the sum, in whatever order the vector lanes add it (a strict
    left-to-right sum would be a chain of dependent adds, one element at a time)."""
    total = 0.0
    for j in range(row.shape[0]):
        value = out[j] * scale[j] if np.float64(row[j]) - top > LOWEST else 0.0
        out[j] = value
        total += value
    return total


@numba.njit(fastmath={"contract", "nsz", "arcp"})
def exp_sum32(row, end, top, out, bits):  # pragma: no cover - compiled
    """The sum (float64) of exp(row[j] - top) for j < end, each term in float32 (row float32, top >= every
    row[j], -inf included: 0); out float32 and bits int32 are scratch at least `end` long. Twice as many lanes as
    `exp_shifted`, for a log-normaliser that feeds float32 weights."""
    for j in range(end):
        x = max(row[j] - top, LOWEST_32)
        n = (x * LOG2E_32 + ROUND_32) - ROUND_32
        r = (x - n * LN2_HI_32) - n * LN2_LO_32
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        out[j] = p * r * r + r + np.float32(1.0)
        bits[j] = (np.int32(n) + np.int32(127)) << np.int32(23)
    return _scaled_sum32(row[:end], top, out[:end], bits.view(np.float32)[:end])


@numba.njit(fastmath={"reassoc", "contract", "nsz", "arcp"})
def _scaled_sum32(row, top, out, scale):  # pragma: no cover - compiled
    """sum of out * scale (0 below exp(-87), -inf included), in any order, in float64."""
    total = 0.0
    for j in range(row.shape[0]):
        total += np.float64(out[j] * scale[j]) if row[j] - top > LOWEST_32 else 0.0
    return total


@numba.njit(cache=True)
def exp_sum32_array(row, top):  # pragma: no cover - compiled
    """`exp_sum32` over a whole float32 row, for the test that holds it to numpy."""
    out = np.empty(row.shape[0], dtype=np.float32)
    bits = np.empty(row.shape[0], dtype=np.int32)
    return exp_sum32(row, row.shape[0], top, out, bits)


@numba.njit(cache=True)
def exp_shifted_array(row, top):  # pragma: no cover - compiled
    """`exp_shifted` over a whole float32 row, for the test that holds it to libm."""
    out = np.empty(row.shape[0], dtype=np.float64)
    bits = np.empty(row.shape[0], dtype=np.int64)
    total = exp_shifted(row, 0, row.shape[0], top, out, bits)
    return out, total
