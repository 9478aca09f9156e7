"""`simhash`: a genuinely approximate retriever, SimHash (random-hyperplane LSH) over queries and keys.

Each query and key is reduced to `bits` signs of random projections (seeded per layer, so runs are reproducible);
the k keys whose codes agree with the query's code on the most bits are retrieved (ties go to the more recent key),
and attention is computed exactly over those k keys. Recall is below 1 wherever the code disagrees with the true
scores, which is what the recall table and heatmaps are there to show.
"""

from __future__ import annotations

import torch

from .common import attend_over_ids, masked_logits, module_softcap

DEFAULT_BITS = 16


def _hyperplanes(dim: int, bits: int, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(dim, bits, generator=generator).to(device)


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
    kv_heads, k_len = key.shape[1], key.shape[2]
    bits = int(getattr(module, "_simhash_bits", DEFAULT_BITS))
    planes = _hyperplanes(dim, bits, seed=1000 + int(getattr(module, "_lmr_layer", 0)), device=query.device)
    query_code = torch.sign(query.float() @ planes).reshape(batch, kv_heads, q_heads // kv_heads, q_len, bits)
    key_code = torch.sign(key.float() @ planes)
    agreement = torch.einsum("bhgqc,bhkc->bhgqk", query_code, key_code).reshape(batch, q_heads, q_len, k_len)
    recency = torch.arange(k_len, device=query.device, dtype=agreement.dtype) / (2 * k_len)  # < 1 bit: ties only
    score = (agreement + recency).masked_fill(~attention_mask, float("-inf"))
    ids = score.topk(min(topk, k_len), dim=-1).indices
    return attend_over_ids(masked_logits(query, key, attention_mask, scaling, module_softcap(module)), ids, value), None, ids
