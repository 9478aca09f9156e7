"""`simhash`: a genuinely approximate retriever, SimHash (random-hyperplane LSH) over queries and keys.

Each query and key is reduced to `bits` signs of random projections (bit i set where the projection on hyperplane i
is positive; the hyperplanes are seeded per layer, so runs are reproducible); the k visible keys whose codes agree
with the query's code on the most bits are retrieved (ties go to the more recent key), and attention is computed
exactly over those k keys. Cost: bits/D key-vector equivalents per visible key (the codes) plus the k exact scores.
Recall is below 1 wherever the code disagrees with the true scores, which is what the
recall table and heatmaps are there to show.

On a CPU the codes are packed into integers (bits <= 62) and compared by popcount in a numba kernel
(`_simhash_scan.py`) that picks each query's keys in one walk back from its newest key and attends over them, never
writing a (queries x keys) matrix; the keys' codes are packed once per sequence and extended at each decode step.
Elsewhere the same rule runs as torch operations (agreement = bits - 2 x Hamming distance, plus a recency fraction
below one bit).
"""

from __future__ import annotations


import numpy as np
import torch

from ...errors import UserInputError
from .._numba import numba_module
from ..kernel_rows import mask_rows, row_groups, row_kernel
from ..topk import row_topk
from .common import attend_over_picked, module_softcap, room_for_decoding, seen_width
from .contract import approx_args, approx_state, method, report_scanned

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
    kernel = _numba_kernel() if query.device.type == "cpu" else None
    if kernel is not None:
        return _simhash_kernel(kernel, module, query, key, value, attention_mask, scaling, topk, planes)
    _report_cost(module, attention_mask.sum(-1), (batch, q_heads, q_len), bits, dim, min(topk, key.shape[2]))
    kv_heads = key.shape[1]
    k_len = seen_width(attention_mask)  # keys after the last one any of these queries may see cannot be retrieved
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


def _report_cost(
    module: torch.nn.Module, visible: torch.Tensor | np.ndarray, shape: tuple[int, int, int], bits: int, dim: int,
    k: int,
) -> None:
    """A bits-wide code compared with every visible key (bits / dim of a key vector each), then k exact scores.
    `visible`: each mask row's visible keys, (B, mask heads, Q) or flat; numpy from the kernel (the arithmetic there
    costs a fraction of torch's per-operation overhead at a decode step's size)."""
    scanned = torch.as_tensor(visible * (bits / dim) + k)
    if scanned.dim() == 1:  # the kernel's counts, one per mask row in (B, mask heads, Q) order
        scanned = scanned.view(shape[0], -1, shape[2])
    report_scanned(module, scanned.expand(*shape))


def _signs(projections: torch.Tensor) -> torch.Tensor:
    """+1 where a projection is positive, -1 elsewhere (as the packed bits of the CPU kernel)."""
    return torch.where(projections > 0, 1.0, -1.0)


def _simhash_kernel(  # type: ignore[no-untyped-def]
    kernels, module, query, key, value, attention_mask, scaling, topk, planes
):
    """The CPU path: see the module docstring and `_simhash_scan.simhash_attend`."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    k = min(topk, k_len)
    rows = batch * q_heads * q_len
    query_rows = query.float().reshape(rows, dim).contiguous()  # a copy where the model's query is a strided view
    query_proj = _projections(query_rows, planes)
    keys = key.float().contiguous().view(batch * kv_heads, k_len, dim)
    key_codes = _key_codes(kernels, module, keys, planes)
    mask_heads = attention_mask.shape[1]
    mask = attention_mask.expand(batch, mask_heads, q_len, k_len).reshape(-1, k_len).contiguous()
    row_group, row_mask = row_groups(batch, q_heads, kv_heads, q_len), mask_rows(batch, q_heads, q_len, mask_heads)
    counts, row_end = np.empty(mask.shape[0], dtype=np.int64), np.empty(mask.shape[0], dtype=np.int64)
    ids = torch.empty(rows, k, dtype=torch.int64)
    out = torch.empty(rows, value.shape[-1])
    softcap = module_softcap(module) or 0.0
    row_kernel(kernels, "simhash_attend", rows)(
        query_proj, key_codes, planes.shape[1], row_group, mask.numpy(), row_mask, counts, row_end,
        query_rows.numpy(), keys.numpy(),
        value.float().contiguous().view(batch * kv_heads, k_len, -1).numpy(), float(scaling), float(softcap),
        ids.numpy(), out.numpy(),
    )  # fmt: skip
    shape = (batch, q_heads, q_len)
    _report_cost(module, counts, shape, planes.shape[1], dim, k)
    return out.view(*shape, -1), None, ids.view(*shape, k)


def _key_codes(kernels, module: torch.nn.Module, keys: torch.Tensor, planes: torch.Tensor) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The packed codes of every key of keys (G, K, D) float32, as (G, >= K) int64 (columns past K are room for
    later keys, never read), kept in the sequence's state and extended by the keys a decode step (or a later
    prefill chunk) adds: a cached key never changes within a sequence, and re-projecting the whole cache at every
    step cost more than the step's own search.

    The kept codes are trusted only if the first and last keys they were packed for are still the same vectors (a
    direct call with other keys of the same shape starts afresh); `_simhash_scan.extend_codes` checks that and
    packs the new keys in one call."""
    groups, k_len, dim = keys.shape
    state = approx_state(module)
    kept = state.get("simhash_codes")
    if kept is not None:
        codes, known, first, last, known_planes = kept
        if codes.shape[0] == groups and known_planes is planes and first.shape[1] == dim and 0 < known <= k_len:
            if codes.shape[1] < k_len:
                grown = _code_buffer(groups, k_len)
                grown[:, :known] = codes[:, :known]
                codes = grown
            projections = _projections(keys[:, known:], planes)
            if kernels.extend_codes(projections, codes, known, keys.numpy(), first, last):
                state["simhash_codes"] = (codes, k_len, first, last, planes)
                return codes
    codes = _code_buffer(groups, k_len)
    first, last = np.empty((groups, dim), dtype=np.float32), np.empty((groups, dim), dtype=np.float32)
    kernels.extend_codes(_projections(keys, planes), codes, 0, keys.numpy(), first, last)
    state["simhash_codes"] = (codes, k_len, first, last, planes)
    return codes


def _code_buffer(groups: int, k_len: int) -> np.ndarray:
    """Room for k_len codes per group and for the decode steps to come (`common.room_for_decoding`)."""
    return np.empty((groups, room_for_decoding(k_len)), dtype=np.int64)


def _projections(vectors: torch.Tensor, planes: torch.Tensor) -> np.ndarray:
    """vectors (..., D) float32 @ planes (D, bits), contiguous. A decode step's few vectors go through numpy, whose
    call costs a fifth of torch's at that size; each vector is projected once, so no code depends on the path."""
    if vectors.numel() < 64 * vectors.shape[-1]:
        return np.ascontiguousarray(vectors.numpy() @ planes.numpy())
    return (vectors @ planes).contiguous().numpy()


def _numba_kernel():  # type: ignore[no-untyped-def]
    """The compiled kernel module, or None where numba cannot be imported (the torch path is used)."""
    return numba_module("approx._simhash_scan")
