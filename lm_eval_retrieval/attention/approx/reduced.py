"""Top-k over scores computed from a few components of each query, for a plainly causal chunk: what `sparq` (the
query's r largest components) and `loki` (r principal directions) select by, in one CPU kernel that never writes
the (queries x keys) scores (see `_reduced_scan.py`)."""

from __future__ import annotations

import torch

from .._numba import numba_module
from ..kernel_rows import row_groups, row_kernel
from ..topk import row_ends


def causal_reduced_topk(
    weights: torch.Tensor,
    dims: torch.Tensor,
    components: torch.Tensor,
    k: int,
    first: int,
    softcap: float | None,
    with_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(values, ids[, lse]) as `topk.row_topk_lse` (or `row_topk`, lse None) gives them for the scores
    s[b, h, i, j] = sum_c weights[b, h, i, c] * components[b, h // (Hq / Hkv), dims[b, h, i, c], j], soft-capped
    where `softcap` is set, query i seeing keys 0 .. first + i; None off the CPU or without numba (the caller scores
    with torch operations).

    weights (B, Hq, Q, r) float32; dims (B, Hq, Q, r) int64; components (B, Hkv, C, W): one row per component
    (the transposed keys for SparQ, the keys' projections for Loki), W >= first + Q keys."""
    kernels = _kernels(weights.device)
    if kernels is None:
        return None
    batch, q_heads, q_len, rank = weights.shape
    kv_heads, width = components.shape[1], components.shape[-1]
    rows = batch * q_heads * q_len
    values = torch.empty(rows, k)
    indices = torch.empty(rows, k, dtype=torch.int64)
    lse = torch.empty(rows if with_lse else 0)
    row_kernel(kernels, "reduced_select", rows)(
        weights.float().reshape(rows, rank).contiguous().numpy(), dims.reshape(rows, rank).long().contiguous().numpy(),
        row_groups(batch, q_heads, kv_heads, q_len),
        components.float().contiguous().view(batch * kv_heads, -1, width).numpy(),
        row_ends(batch * q_heads, q_len, width, first), float(softcap or 0.0), values.numpy(), indices.numpy(),
        lse.numpy(),
    )  # fmt: skip
    shape = (batch, q_heads, q_len)
    return values.view(*shape, k), indices.view(*shape, k), lse.view(shape) if with_lse else None


def largest_components(
    query: torch.Tensor, rank: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weights, dims) (B, Hq, Q, r) for `causal_reduced_topk` from SparQ's rule: each query's r components of
    largest magnitude, each times scaling / sqrt(|q_r|_1 / |q|_1); None off the CPU or without numba. One kernel
    pass over the queries, where torch's top-k, gathers and sums cost a dozen small tensors per chunk."""
    kernels = _kernels(query.device)
    if kernels is None:
        return None
    batch, q_heads, q_len, dim = query.shape
    rows = batch * q_heads * q_len
    weights = torch.empty(rows, rank)
    dims = torch.empty(rows, rank, dtype=torch.int64)
    kernels.largest_components(
        query.float().reshape(rows, dim).contiguous().numpy(), float(scaling), weights.numpy(), dims.numpy()
    )
    shape = (batch, q_heads, q_len, rank)
    return weights.view(shape), dims.view(shape)


def _kernels(device: torch.device):  # type: ignore[no-untyped-def]
    """The compiled `_reduced_scan` module on a CPU; None elsewhere or without numba (the torch paths are used)."""
    return numba_module("approx._reduced_scan") if device.type == "cpu" else None
