"""`simhash`: a genuinely approximate retriever, SimHash (random-hyperplane LSH) over queries and keys.

Each query and key is reduced to `bits` signs of random projections (bit i set where the projection on hyperplane i
is positive; the hyperplanes are seeded per layer, so runs are reproducible); the k visible keys whose codes agree
with the query's code on the most bits are retrieved (ties go to the more recent key), and attention is computed
exactly over those k keys. Cost: bits/D key-vector equivalents per visible key (the codes) plus the k exact scores.
Recall is below 1 wherever the code disagrees with the true scores, which is what the
recall table and heatmaps are there to show.

On a CPU the codes are packed into integers (bits <= 62) and compared by popcount in a numba kernel
(`_simhash_scan.py`) that picks each query's keys by counting and attends over them, never writing a (queries x keys) matrix; elsewhere the
same rule runs as torch operations (agreement = bits - 2 x Hamming distance, plus a recency fraction below one bit).
"""

from __future__ import annotations

import functools
import weakref

import torch

from ...errors import UserInputError
from ..topk import match_torch_threads, row_topk
from .common import attend_over_picked, module_softcap
from .contract import approx_args, method, report_scanned

DEFAULT_BITS = 16
MAX_BITS = 62  # codes are packed into one int64


def _hyperplanes(module: torch.nn.Module, dim: int, bits: int, device: torch.device) -> torch.Tensor:
    """The layer's (dim, bits) random hyperplanes, seeded by layer and drawn once (not at every decode step)."""
    key = (dim, bits, device)
    cached = getattr(module, "_simhash_planes", None)
    if cached is None or cached[0] != key:
        seed = 1000 + int(getattr(module, "_lmr_layer", 0))
        planes = torch.randn(dim, bits, generator=torch.Generator().manual_seed(seed)).to(device)
        module._simhash_planes = cached = (key, planes)
    return cached[1]


@method(bits=DEFAULT_BITS)
def simhash(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float,
    topk: int,
) -> tuple[torch.Tensor, None, torch.Tensor]:
    batch, q_heads, q_len, dim = query.shape
    bits = int(approx_args(module, simhash)["bits"])
    if not 0 < bits <= MAX_BITS:
        raise UserInputError(f"approx=simhash needs 1 <= bits <= {MAX_BITS}, got bits={bits}")
    planes = _hyperplanes(module, dim, bits, query.device)
    # Cost: a bits-wide code compared with every visible key (bits / dim of a key vector each), then k exact scores.
    visible = attention_mask.sum(-1).expand(batch, q_heads, q_len)
    report_scanned(module, visible * (bits / dim) + min(topk, key.shape[2]))
    kernel = _numba_kernel() if query.device.type == "cpu" else None
    if kernel is not None:
        return _simhash_kernel(kernel, module, query, key, value, attention_mask, scaling, topk, planes)
    kv_heads = key.shape[1]
    # Keys after the last one any of these queries may see cannot be retrieved: score only up to it.
    seen = attention_mask.flatten(0, -2).any(0).nonzero()
    k_len = int(seen.max()) + 1 if seen.numel() else 1
    visible = attention_mask[..., :k_len]
    query_code = _signs(query.float() @ planes).reshape(batch, kv_heads, (q_heads // kv_heads) * q_len, bits)
    key_code = _signs(key[:, :, :k_len].float() @ planes)
    agreement = torch.matmul(query_code, key_code.transpose(-1, -2)).view(batch, q_heads, q_len, k_len)
    recency = torch.arange(k_len, device=query.device, dtype=agreement.dtype) / (2 * k_len)  # < 1 bit: ties only
    score = agreement.add_(recency).masked_fill_(~visible, float("-inf"))
    ids = row_topk(score, min(topk, k_len))[1]
    # The full (contiguous) key and value: the ids index them the same, and whole rows are copied at once.
    output = attend_over_picked(query, key, value, attention_mask, ids, scaling, module_softcap(module))
    return output, None, ids


def _signs(projections: torch.Tensor) -> torch.Tensor:
    """+1 where a projection is positive, -1 elsewhere (as the packed bits of the CPU kernel)."""
    return torch.where(projections > 0, 1.0, -1.0)


def _simhash_kernel(  # type: ignore[no-untyped-def]
    kernel, module, query, key, value, attention_mask, scaling, topk, planes
):
    """The CPU path: see the module docstring and `_simhash_scan.simhash_attend`."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    k = min(topk, k_len)
    group = q_heads // kv_heads
    query_proj = (query.float() @ planes).reshape(-1, planes.shape[1])
    key_proj = _key_projections(module, key, planes).view(batch * kv_heads, k_len, planes.shape[1])
    heads = torch.arange(q_heads).repeat_interleave(q_len)
    row_group = (torch.arange(batch)[:, None] * kv_heads + heads // group).reshape(-1)
    mask_heads = attention_mask.shape[1]
    mask = attention_mask.expand(batch, mask_heads, q_len, k_len).reshape(-1, k_len).contiguous()
    positions = torch.arange(q_len).repeat(q_heads)
    row_mask = (
        torch.arange(batch)[:, None] * (mask_heads * q_len)
        + (heads if mask_heads > 1 else torch.zeros_like(heads)) * q_len
        + positions
    ).reshape(-1)
    rows = batch * q_heads * q_len
    ids = torch.empty(rows, k, dtype=torch.int64)
    out = torch.empty(rows, value.shape[-1])
    softcap = module_softcap(module) or 0.0
    match_torch_threads()
    kernel(
        query_proj.numpy(), key_proj.numpy(), row_group.numpy(), mask.numpy(), row_mask.numpy(),
        query.float().reshape(rows, dim).contiguous().numpy(),
        key.float().contiguous().view(batch * kv_heads, k_len, dim).numpy(),
        value.float().contiguous().view(batch * kv_heads, k_len, -1).numpy(), float(scaling), float(softcap),
        ids.numpy(), out.numpy(),
    )  # fmt: skip
    shape = (batch, q_heads, q_len)
    return out.view(*shape, -1), None, ids.view(*shape, k)


def _key_projections(module: torch.nn.Module, key: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """key @ planes, kept for the next call with this very key tensor: the probe hands a long prefill's queries over
    chunk by chunk against the same keys, which would otherwise be projected once per chunk."""
    cached = getattr(module, "_simhash_key_proj", None)
    stamp = (key.data_ptr(), tuple(key.shape), key._version, planes.data_ptr())
    if cached is not None and cached[0]() is key and cached[1] == stamp:
        return cached[2]
    projections = key.float() @ planes
    module._simhash_key_proj = (weakref.ref(key), stamp, projections)
    return projections


@functools.cache
def _numba_kernel():  # type: ignore[no-untyped-def]
    """The compiled kernel, or None where numba cannot be imported (the torch path is used)."""
    try:
        from ._simhash_scan import simhash_attend
    except ImportError:
        return None
    return simhash_attend
