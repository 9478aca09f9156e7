"""`simhash`: a genuinely approximate retriever, SimHash (random-hyperplane LSH) over queries and keys.

Each query and key is reduced to `bits` signs of random projections (seeded per layer, so runs are reproducible);
the k keys whose codes agree with the query's code on the most bits are retrieved (ties go to the more recent key),
and attention is computed exactly over those k keys. Recall is below 1 wherever the code disagrees with the true
scores, which is what the recall table and heatmaps are there to show.
"""

from __future__ import annotations

import torch

from ..topk import row_topk
from .common import attend_over_picked, module_softcap

DEFAULT_BITS = 16


def _hyperplanes(module: torch.nn.Module, dim: int, bits: int, device: torch.device) -> torch.Tensor:
    """The layer's (dim, bits) random hyperplanes, seeded by layer and drawn once (not at every decode step)."""
    key = (dim, bits, device)
    cached = getattr(module, "_simhash_planes", None)
    if cached is None or cached[0] != key:
        seed = 1000 + int(getattr(module, "_lmr_layer", 0))
        planes = torch.randn(dim, bits, generator=torch.Generator().manual_seed(seed)).to(device)
        module._simhash_planes = cached = (key, planes)
    return cached[1]


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
    kv_heads = key.shape[1]
    # Keys after the last one any of these queries may see cannot be retrieved: score only up to it.
    k_len = int(attention_mask.flatten(0, -2).any(0).nonzero().max()) + 1 if attention_mask.any() else 1
    visible = attention_mask[..., :k_len]
    bits = int(getattr(module, "_simhash_bits", DEFAULT_BITS))
    planes = _hyperplanes(module, dim, bits, query.device)
    query_code = torch.sign(query.float() @ planes).reshape(batch, kv_heads, (q_heads // kv_heads) * q_len, bits)
    key_code = torch.sign(key[:, :, :k_len].float() @ planes)
    agreement = torch.matmul(query_code, key_code.transpose(-1, -2)).view(batch, q_heads, q_len, k_len)
    recency = torch.arange(k_len, device=query.device, dtype=agreement.dtype) / (2 * k_len)  # < 1 bit: ties only
    score = agreement.add_(recency).masked_fill_(~visible, float("-inf"))
    ids = row_topk(score, min(topk, k_len))[1]
    # The full (contiguous) key and value: the ids index them the same, and whole rows are copied at once.
    output = attend_over_picked(query, key, value, attention_mask, ids, scaling, module_softcap(module))
    return output, None, ids
