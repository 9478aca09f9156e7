"""The exact top-k of every row of a score matrix: the single largest cost of analysing a long prefill on a CPU.

`torch.topk` copies each row into a (value, index) queue before selecting, about 1.5-7 ns per score on a CPU plus a
fixed cost per row, whatever k is. A prefill of L tokens has L x heads rows per layer, so at 4k tokens the top-k
cost more than the backend's whole attention. Two facts make it cheaper:

* every one of a row's k largest scores lies in one of the k blocks (of BLOCK scores) with the largest maxima: a
  block holding one of them has a maximum at least the k-th largest score, which no other block reaches;
* block maxima are one vectorised pass, so picking the k best blocks reads W / BLOCK numbers, and the top-k is
  then taken over k x BLOCK scores instead of W.

On a CPU this runs as a small numba kernel (compiled once, cached on disk) that takes each row's block maxima and
its top-k in one visit, while the row is in cache: parallel over the rows of a prefill, on the calling thread for
a decode step's few rows, where the dozen small tensors of the torch rule cost more than the scores. Without
numba, and on GPUs (where `torch.topk` is fast), the same rule runs as torch operations.
Ties may be broken differently from `torch.topk`; every caller treats the ids as a set.

`attend_topk` is what the default approximation (`exact_topk`) does with those ids, for every row at once: the
softmax over the k scores, its output, its error against the exact output and the exact mass the k keys hold. As
torch operations that is a dozen small tensors per chunk; on a CPU one kernel does it per row.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ._numba import numba_module
from .kernel_rows import row_groups, row_kernel

BLOCK = 32  # scores per block (the CPU kernel's own _topk_scan.BLOCK is the same)
MIN_BLOCKS_PER_K = 4  # without numba, rows shorter than BLOCK * MIN_BLOCKS_PER_K * k go to torch.topk directly


def row_topk(scores: torch.Tensor, k: int, causal_first: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries of each row of `scores` (last dimension, at least k wide), largest
    first.

    `causal_first`: row i (along the second-last dimension) sees only columns up to causal_first + i, as a causal
    chunk's queries do; the later columns count as -inf. The CPU kernel never reads them; elsewhere they are set to
    -inf in `scores` itself first."""
    width = scores.shape[-1]
    blocks = width // BLOCK
    if scores.device.type == "cpu" and scores.dtype == torch.float32:
        kernels = _numba_kernels()
        if kernels is not None and 0 < k <= width:
            return _best_blocks(kernels, scores.contiguous(), k, causal_first)
    if causal_first is not None:
        mask_future(scores, causal_first)
    if blocks >= MIN_BLOCKS_PER_K * k > 0:
        return _block_candidates(scores, k, blocks)
    return scores.topk(k, dim=-1)


def row_topk_lse(
    scores: torch.Tensor, k: int, causal_first: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`row_topk`, and each row's log-sum-exp over the scores it sees (..., ) float32 (-inf for a row that sees
    none): on a CPU in the same kernel, while the row is in cache, instead of a softmax over every score."""
    width = scores.shape[-1]
    if scores.device.type == "cpu" and scores.dtype == torch.float32:
        kernels = _numba_kernels()
        if kernels is not None and 0 < k <= width:
            return _best_blocks(kernels, scores.contiguous(), k, causal_first, with_lse=True)
    if causal_first is not None:
        mask_future(scores, causal_first)
    values, indices = row_topk(scores, k)
    return values, indices, torch.logsumexp(scores, dim=-1)


def placeholder_ids(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, valid) from a top-k's (values, ids): a slot whose value is -inf (fewer than k finite scores) names its
    row's first id instead, valid False (the probe counts a repeat once, and the output gives it no weight)."""
    valid = values > float("-inf")
    return torch.where(valid, ids, ids[..., :1]), valid


def mask_future(scores: torch.Tensor, causal_first: int) -> torch.Tensor:
    """`scores` (..., C, W) with column j of row i set to -inf where j > causal_first + i (in place)."""
    size, width = scores.shape[-2], scores.shape[-1]
    if causal_first + size > width:
        raise ValueError(f"row {size - 1} would see column {causal_first + size - 1} of {width}")
    if size > 1:
        scores[..., causal_first : causal_first + size].masked_fill_(_upper(size, scores.device), float("-inf"))
    scores[..., causal_first + size:] = float("-inf")
    return scores


def _best_blocks(  # type: ignore[no-untyped-def]
    kernels, scores: torch.Tensor, k: int, causal_first: int | None, with_lse: bool = False
) -> tuple[torch.Tensor, ...]:
    size, width = scores.shape[-2], scores.shape[-1]
    rows = scores.reshape(-1, width)
    ends = row_ends(rows.shape[0] // size, size, width, causal_first)
    values = torch.empty(rows.shape[0], k, dtype=scores.dtype)
    indices = torch.empty(rows.shape[0], k, dtype=torch.int64)
    shape = (*scores.shape[:-1], k)
    if with_lse:
        lse = torch.empty(rows.shape[0], dtype=torch.float32)
        row_kernel(kernels, "best_blocks_lse_scan", rows.shape[0])(
            rows.numpy(), ends, values.numpy(), indices.numpy(), lse.numpy()
        )
        return values.view(shape), indices.view(shape), lse.view(scores.shape[:-1])
    row_kernel(kernels, "best_blocks_scan", rows.shape[0])(rows.numpy(), ends, values.numpy(), indices.numpy())
    return values.view(shape), indices.view(shape)


@functools.lru_cache(maxsize=16)
def _upper(size: int, device: torch.device) -> torch.Tensor:
    """Bool (size, size), True above the diagonal: the keys after each query inside a causal chunk's own block."""
    return torch.ones(size, size, dtype=torch.bool, device=device).triu_(1)


@functools.lru_cache(maxsize=64)
def row_ends(groups: int, size: int, width: int, causal_first: int | None) -> np.ndarray:
    """One past the last column each row reads: causal_first + 1 + its index within its chunk of `size`, or the
    whole width. Shapes only, so every layer reuses it."""
    if causal_first is None:
        return np.full(groups * size, width, dtype=np.int64)
    return np.tile(np.arange(causal_first + 1, causal_first + size + 1, dtype=np.int64), groups)


def _block_candidates(scores: torch.Tensor, k: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k over the k best blocks' scores (and the last partial block's), with torch operations only."""
    whole = blocks * BLOCK
    blocked = scores[..., :whole].unflatten(-1, (blocks, BLOCK))
    best_blocks = blocked.amax(-1).topk(k, dim=-1).indices
    candidates = blocked.gather(-2, best_blocks.unsqueeze(-1).expand(*best_blocks.shape, BLOCK)).flatten(-2)
    if whole < scores.shape[-1]:
        candidates = torch.cat([candidates, scores[..., whole:]], dim=-1)
    values, picked = candidates.topk(k, dim=-1)
    in_blocks = picked < k * BLOCK
    block_ids = best_blocks.gather(-1, (picked // BLOCK).clamp_(max=k - 1)) * BLOCK + picked % BLOCK
    return values, torch.where(in_blocks, block_ids, picked - k * BLOCK + whole)


def attend_topk(
    scores: torch.Tensor, ids: torch.Tensor, value: torch.Tensor, exact: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax attention over each query's top-k keys against the exact attention.

    scores, ids (B, Hq, Q, k): the top-k scores (largest first; -inf placeholders where fewer keys are visible) and
    key ids; value (B, Hkv, K, D); exact (B, Hq, Q, D) float32 and lse (B, Hq, Q): the exact output and softmax
    log-normaliser. Returns (output (B, Hq, Q, D) float32, 0 for a query that sees nothing; relative error norm
    ||output - exact|| / ||exact|| (B, Hq, Q); exact softmax mass of the k keys (B, Hq, Q)).
    """
    kernels = _numba_kernels() if scores.device.type == "cpu" and scores.dtype == torch.float32 else None
    if kernels is None or value.dtype != torch.float32:
        from .approx.common import weighted_ids  # here: approx/ imports this module (simhash's top-k)

        weights = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
        output = weighted_ids(weights, ids, value)
        error = (output - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-30)
        mass = torch.where(scores > float("-inf"), (scores - lse.unsqueeze(-1)).exp(), 0.0).sum(-1)
        return output, error, mass
    batch, q_heads, q_len, k = ids.shape
    kv_heads, dim = value.shape[1], value.shape[-1]
    groups = value.contiguous().view(batch * kv_heads, -1, dim)
    rows = batch * q_heads * q_len
    output = torch.empty(rows, dim)
    error, mass = torch.empty(rows), torch.empty(rows)
    row_kernel(kernels, "attend_topk", rows)(
        scores.reshape(rows, k).contiguous().numpy(), ids.reshape(rows, k).contiguous().numpy(),
        row_groups(batch, q_heads, kv_heads, q_len), groups.numpy(), exact.reshape(rows, dim).contiguous().numpy(),
        lse.reshape(rows).float().contiguous().numpy(), output.numpy(), error.numpy(), mass.numpy(),
    )  # fmt: skip
    return output.view(batch, q_heads, q_len, dim), error.view(batch, q_heads, q_len), mass.view(batch, q_heads, q_len)


def exact_step(
    scores: torch.Tensor, k: int, value: torch.Tensor, exact: torch.Tensor, lse: torch.Tensor, sums: torch.Tensor,
    attended: float,
) -> torch.Tensor | None:
    """A decode step of `exact_topk` in one CPU kernel (`_topk_scan.exact_step`): the output over each query's
    exact top-k (B, Hq, 1, D), its statistics added to `sums` (1 + fields, Hq) float64 in place. None where the
    kernel does not apply (off the CPU, not float32, no numba): the caller takes the general path.

    scores (B, Hq, 1, W) the step's scores, every key visible; value (B, Hkv, K, D); exact (B, Hq, 1, D) and lse
    (B, Hq, 1) the exact output and log-normaliser; attended: k over the visible keys."""
    if scores.device.type != "cpu" or scores.dtype != torch.float32 or value.dtype != torch.float32:
        return None
    if sums.dtype != torch.float64 or not sums.is_contiguous():
        return None
    kernels = _numba_kernels()
    if kernels is None:
        return None
    batch, q_heads, q_len, width = scores.shape
    kv_heads, dim = value.shape[1], value.shape[-1]
    rows = batch * q_heads * q_len
    output = torch.empty(rows, dim)
    kernels.exact_step(
        scores.reshape(rows, width).contiguous().numpy(), k, row_groups(batch, q_heads, kv_heads, q_len),
        value.contiguous().view(batch * kv_heads, -1, dim).numpy(), exact.reshape(rows, dim).contiguous().numpy(),
        lse.reshape(rows).float().contiguous().numpy(), output.numpy(), sums.numpy(), q_heads, float(attended),
    )  # fmt: skip
    return output.view(batch, q_heads, q_len, dim)


def _numba_kernels():  # type: ignore[no-untyped-def]
    """The compiled kernels (see _topk_scan.py), or None where numba cannot be imported (torch paths are used)."""
    return numba_module("_topk_scan")
