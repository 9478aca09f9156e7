"""The exact top-k of every row of a score matrix: the single largest cost of analysing a long prefill on a CPU.

`torch.topk` copies each row into a (value, index) queue before selecting, about 1.5-7 ns per score on a CPU plus a
fixed cost per row, whatever k is. A prefill of L tokens has L x heads rows per layer, so at 4k tokens the top-k
cost more than the backend's whole attention. Two facts make it cheaper:

* every one of a row's k largest scores lies in one of the k blocks (of BLOCK scores) with the largest maxima: a
  block holding one of them has a maximum at least the k-th largest score, which no other block reaches;
* block maxima are one vectorised pass (`amax`), so a scan that keeps the k best seen so far can skip every block
  whose maximum does not beat the current k-th best, which after the first few blocks is nearly all of them.

On a CPU the scan runs as a small numba kernel, parallel over rows (numba compiles it once and caches it on disk);
without numba, and on GPUs (where `torch.topk` is fast), the first fact alone is used with torch operations.
Ties may be broken differently from `torch.topk`; every caller treats the ids as a set.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

BLOCK = 32  # scores per block
MIN_BLOCKS_PER_K = 4  # without numba, rows shorter than BLOCK * MIN_BLOCKS_PER_K * k go to torch.topk directly
# Fewer rows (a decode step has one per head) cost less in torch.topk than waking a second thread pool beside torch's.
MIN_KERNEL_ROWS = 256


def row_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries of each row of `scores` (last dimension, at least k wide), largest
    first."""
    width = scores.shape[-1]
    blocks = width // BLOCK
    rows = scores.numel() // max(width, 1)
    if scores.device.type == "cpu" and scores.dtype == torch.float32 and rows >= MIN_KERNEL_ROWS:
        kernel = _numba_kernel()
        if kernel is not None and 0 < k <= width:
            return _skip_scan(kernel, scores.contiguous(), k, blocks)
    if blocks >= MIN_BLOCKS_PER_K * k > 0:
        return _block_candidates(scores, k, blocks)
    return scores.topk(k, dim=-1)


def _skip_scan(kernel: Callable, scores: torch.Tensor, k: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = scores.reshape(-1, scores.shape[-1])
    maxima = rows[:, : blocks * BLOCK].view(rows.shape[0], blocks, BLOCK).amax(-1)
    values = torch.empty(rows.shape[0], k, dtype=scores.dtype)
    indices = torch.empty(rows.shape[0], k, dtype=torch.int64)
    _match_torch_threads()
    kernel(rows.numpy(), maxima.numpy(), BLOCK, values.numpy(), indices.numpy())
    shape = (*scores.shape[:-1], k)
    return values.view(shape), indices.view(shape)


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


def _match_torch_threads() -> None:
    """numba's pool uses as many threads as torch's (a user who limits one limits both)."""
    import numba

    wanted = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)


@functools.cache
def _numba_kernel() -> Callable | None:
    """The compiled scan (see _topk_scan.py), or None where numba cannot be imported (the torch path is used)."""
    try:
        from ._topk_scan import skip_scan
    except ImportError:
        return None
    return skip_scan
