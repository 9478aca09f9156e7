"""A user's approximation, importable as `user_approx:first_keys` (tests put this folder on sys.path)."""

import torch

from lm_eval_retrieval.attention.approx import exact_topk


def first_keys(module, query, key, value, attention_mask, scaling, topk):
    """Deliberately bad: always 'retrieves' the first k keys."""
    ids = torch.arange(min(topk, key.shape[2])).expand(*query.shape[:3], -1)
    return exact_topk(module, query, key, value, attention_mask, scaling, topk)[0], None, ids
