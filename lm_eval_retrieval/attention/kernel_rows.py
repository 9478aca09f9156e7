"""How the numba kernels lay a (batch, head, query) block out as rows, and when they run in parallel: shared by the
exact top-k, the id-set metrics and the approximations' kernels, below all of them."""

from __future__ import annotations

import functools

import numpy as np
import torch

# Fewer rows (a decode step has one per head) cost less in torch.topk, or in a kernel on the calling thread, than
# waking a second thread pool beside torch's.
MIN_KERNEL_ROWS = 256


def row_kernel(kernels, name: str, rows: int):  # type: ignore[no-untyped-def]
    """The kernel `name` of a compiled module, parallel for many rows; its `<name>_serial` twin, on the calling
    thread, for a few (a decode step)."""
    if rows >= MIN_KERNEL_ROWS:
        match_torch_threads()
        return getattr(kernels, name)
    return getattr(kernels, f"{name}_serial")


def match_torch_threads() -> None:
    """numba's pool uses as many threads as torch's (a user who limits one limits both)."""
    import numba

    wanted = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)


@functools.lru_cache(maxsize=64)
def row_groups(batch: int, q_heads: int, kv_heads: int, q_len: int) -> np.ndarray:
    """For each row (batch, query head, query) in order, the (batch x KV head) group whose keys and values it reads
    (grouped-query attention shares a KV head between q_heads / kv_heads query heads). Shapes only, so a decode
    step reuses it."""
    group = np.arange(batch * kv_heads).reshape(batch, kv_heads, 1, 1)
    group = np.repeat(group, q_heads // kv_heads, axis=1)
    return np.ascontiguousarray(np.broadcast_to(group, (batch, q_heads, q_len, 1))).reshape(-1)


@functools.lru_cache(maxsize=64)
def mask_rows(batch: int, q_heads: int, q_len: int, mask_heads: int) -> np.ndarray:
    """For each row (batch, query head, query) in order, its row of the flattened (B x mask heads x Q) mask (a
    mask has one head, shared, or one per query head). Shapes only, so a decode step reuses it."""
    rows = np.arange(batch * mask_heads * q_len).reshape(batch, mask_heads, q_len)
    return np.ascontiguousarray(np.broadcast_to(rows, (batch, q_heads, q_len))).reshape(-1)
