"""`exact_topk`: attend only to the k keys with the largest true scores.

Recall is 1 by construction; the error norm measures what the attention mass outside those k keys was worth.
"""

from __future__ import annotations

import torch

from .common import attend_over_ids, masked_logits, module_softcap


def exact_topk(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float,
    topk: int,
) -> tuple[torch.Tensor, None, torch.Tensor]:
    logits = masked_logits(query, key, attention_mask, scaling, module_softcap(module))
    ids = logits.topk(min(topk, logits.shape[-1]), dim=-1).indices
    return attend_over_ids(logits, ids, value), None, ids
