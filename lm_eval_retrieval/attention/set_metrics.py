"""What an approximation's key ids are worth against the exact attention, per query: the measurements behind the
recall table for every method other than `exact_topk` (whose ids are the exact ones, see `topk.attend_topk`)."""

from __future__ import annotations

import functools

import numpy as np
import torch

from ._numba import numba_module
from .kernel_rows import mask_rows, row_kernel

NEG_INF = float("-inf")


def id_set_metrics(
    logits: torch.Tensor,
    lse: torch.Tensor,
    exact_scores: torch.Tensor,
    exact_ids: torch.Tensor,
    approx_ids: torch.Tensor,
    approx_out: torch.Tensor,
    exact_out: torch.Tensor,
    first_own: int | None,
    attend: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hits, approx mass, used, error norm, exact mass), each (B, Hq, C).

    logits (B, Hq, C, W): the chunk's exact scores (-inf where a key is not visible); lse (B, Hq, C[, 1]) their
    log-normaliser; exact_scores / exact_ids (B, Hq, C, k): the exact top-k (-inf placeholders where fewer keys are
    visible); approx_ids (B, Hq, C, k'), approx_out and exact_out (B, Hq, C, D) float32. A key is visible to the
    chunk's query c when c's causal position first_own + c reaches it (`first_own` given, plain causal attention)
    or where `attend` (B, 1 or Hq, C, K) says so.

    hits counts the distinct visible approximate ids that are in the exact top-k (Recall@k = hits / min(k,
    visible)); used counts the distinct visible approximate ids (repeats and invisible ids count nothing); the masses
    are exact-softmax masses; error is ||approx_out - exact_out|| / ||exact_out||.
    """
    batch, heads, size, width = logits.shape
    rows = batch * heads * size
    lse = lse.reshape(batch, heads, size)
    kernels = numba_module("_metrics_scan") if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
    if kernels is None:
        return _torch_metrics(logits, lse, exact_scores, exact_ids, approx_ids, approx_out, exact_out, first_own, attend)
    if attend is None:
        row_limit = _row_offsets(batch, heads, size) + first_own
        mask, row_mask = _NO_MASK, _no_mask_rows(rows)
    else:
        row_limit = np.full(rows, width - 1)
        mask = attend.reshape(-1, attend.shape[-1]).contiguous().numpy()
        row_mask = mask_rows(batch, heads, size, attend.shape[1])
    hits, used = torch.empty(rows, dtype=torch.int64), torch.empty(rows, dtype=torch.int64)
    mass, error, exact_mass = torch.empty(rows), torch.empty(rows), torch.empty(rows)
    row_kernel(kernels, "id_set_metrics", rows)(
        logits.reshape(rows, width).contiguous().numpy(), lse.reshape(rows).float().contiguous().numpy(),
        exact_scores.reshape(rows, -1).float().contiguous().numpy(), exact_ids.reshape(rows, -1).contiguous().numpy(),
        approx_ids.reshape(rows, -1).long().contiguous().numpy(), row_limit, mask, row_mask,
        approx_out.reshape(rows, -1).contiguous().numpy(), exact_out.reshape(rows, -1).contiguous().numpy(),
        hits.numpy(), mass.numpy(), used.numpy(), error.numpy(), exact_mass.numpy(),
    )  # fmt: skip
    shape = (batch, heads, size)
    return hits.view(shape), mass.view(shape), used.view(shape), error.view(shape), exact_mass.view(shape)


def id_set_step(
    logits: torch.Tensor,
    k: int,
    lse: torch.Tensor,
    approx_ids: torch.Tensor,
    approx_out: torch.Tensor,
    exact_out: torch.Tensor,
    scanned: torch.Tensor | float | None,
    keys_seen: int,
    sums: torch.Tensor,
) -> bool:
    """A decode step of an approximation in one CPU kernel (`_metrics_scan.id_set_step`): the exact top-k of each
    query, its approximate ids measured against it, the statistics added to `sums` (1 + fields, Hq) float64 in
    place. False where the kernel does not apply (off the CPU, not float32, no numba): the caller takes the general
    path, `row_topk` then `id_set_metrics`.

    logits (B, Hq, 1, W): the step's scores, keys 0..W-1 all visible (plain causal attention); lse (B, Hq, 1[, 1]);
    approx_ids (B, Hq, 1, k'); approx_out, exact_out (B, Hq, 1, D) float32; scanned: the method's reported work per
    query (a number, (B, Hq, 1), or None); keys_seen: W. Recall is hits / min(k, W)."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or approx_out.dtype != torch.float32:
        return False
    if sums.dtype != torch.float64 or not sums.is_contiguous():
        return False
    kernels = numba_module("_metrics_scan")
    if kernels is None:
        return False
    batch, heads, size, width = logits.shape
    rows = batch * heads * size
    if scanned is None:
        per_row = np.full(rows, np.nan)
    else:
        per_row = torch.as_tensor(scanned, dtype=torch.float64).expand(batch, heads, size).reshape(rows).numpy()
    kernels.id_set_step(
        logits.reshape(rows, width).contiguous().numpy(), k, lse.reshape(rows).float().contiguous().numpy(),
        approx_ids.reshape(rows, -1).long().contiguous().numpy(), np.full(rows, width - 1),
        approx_out.reshape(rows, -1).contiguous().numpy(), exact_out.reshape(rows, -1).contiguous().numpy(),
        per_row, float(min(k, width)), float(keys_seen), sums.numpy(), heads,
    )  # fmt: skip
    return True


_NO_MASK = np.zeros((1, 1), dtype=np.bool_)


@functools.lru_cache(maxsize=64)
def _row_offsets(batch: int, heads: int, size: int) -> np.ndarray:
    """Each row's query index within the chunk (rows in (batch, head, query) order); shapes only, so reused."""
    return np.tile(np.arange(size), batch * heads)


@functools.lru_cache(maxsize=64)
def _no_mask_rows(rows: int) -> np.ndarray:
    return np.full(rows, -1)


def _torch_metrics(
    logits: torch.Tensor,
    lse: torch.Tensor,
    exact_scores: torch.Tensor,
    exact_ids: torch.Tensor,
    approx_ids: torch.Tensor,
    approx_out: torch.Tensor,
    exact_out: torch.Tensor,
    first_own: int | None,
    attend: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same as tensor operations (GPUs, or no numba). Order does not matter to a set: the ids are sorted, so
    repeats sit side by side and membership in the exact top-k is a binary search, O(k log k) per query."""
    lse = lse.unsqueeze(-1)
    exact_ok = exact_scores > NEG_INF
    exact_mass = torch.where(exact_ok, (exact_scores - lse).exp(), 0.0).sum(-1)
    approx_ids = approx_ids.long().sort(dim=-1).values
    first = torch.ones_like(approx_ids, dtype=torch.bool)
    first[..., 1:] = approx_ids[..., 1:] != approx_ids[..., :-1]
    if attend is None:
        own = torch.arange(first_own, first_own + logits.shape[2], device=approx_ids.device)[:, None]
        visible = (approx_ids >= 0) & (approx_ids <= own)
    else:
        keys = attend.shape[-1]
        seen = attend.expand(*approx_ids.shape[:3], -1).gather(-1, approx_ids.clamp(0, keys - 1))
        visible = (approx_ids >= 0) & (approx_ids < keys) & seen
    approx_ok = first & visible
    picked = logits.gather(-1, approx_ids.clamp(0, logits.shape[-1] - 1))
    exact_sorted = exact_ids.masked_fill(~exact_ok, -1).sort(dim=-1).values.contiguous()
    slot = torch.searchsorted(exact_sorted, approx_ids.contiguous()).clamp_(max=exact_ids.shape[-1] - 1)
    hits = ((exact_sorted.gather(-1, slot) == approx_ids) & approx_ok).sum(-1)
    mass = torch.where(approx_ok, (picked - lse).exp(), 0.0).sum(-1)
    error = (approx_out - exact_out).norm(dim=-1) / exact_out.norm(dim=-1).clamp_min(1e-30)
    return hits, mass, approx_ok.sum(-1), error, exact_mass
