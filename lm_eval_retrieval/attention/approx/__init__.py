"""Approximate attentions, one file each, all with the seed's `_approx_attn` contract:

    approx_attn(module, query, key, value, attention_mask, scaling, topk)
        -> (approx_output (B, Hq, Q, D), approx_scores (B, Hq, Q, K) or None, topk_ids (B, Hq, Q, k))

query (B, Hq, Q, D); key/value (B, Hkv, K, D) (GQA: query head h uses KV head h // (Hq/Hkv)); attention_mask is
bool (B, 1, Q, K), True where the key is visible (causal, padding and sliding window applied).
"""

from __future__ import annotations

import importlib
from typing import Callable

from ...errors import UserInputError
from .common import exact_attention
from .exact_topk import exact_topk
from .simhash import simhash

ApproxFn = Callable[..., tuple]

BUILTIN: dict[str, ApproxFn] = {"exact_topk": exact_topk, "simhash": simhash}


def resolve_approx(spec: str | ApproxFn | None) -> tuple[str, ApproxFn]:
    """A built-in name or `package.module:function` -> (display name, function)."""
    if spec is None or spec == "":
        return "exact_topk", exact_topk
    if callable(spec):
        return getattr(spec, "__name__", "custom"), spec
    if spec in BUILTIN:
        return spec, BUILTIN[spec]
    if ":" not in spec:
        raise UserInputError(
            f"approx={spec!r} is neither a built-in ({', '.join(BUILTIN)}) nor 'package.module:function'"
        )
    module_name, _, attribute = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise UserInputError(f"approx={spec!r} cannot be imported ({type(error).__name__}: {error}); check the path")
    if not callable(function):
        raise UserInputError(f"approx={spec!r} is not a function")
    return spec, function


__all__ = ["BUILTIN", "exact_attention", "exact_topk", "resolve_approx", "simhash"]
