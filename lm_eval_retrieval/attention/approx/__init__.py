"""Approximate attentions, one file each, all with the seed's `_approx_attn` contract:

    approx_attn(module, query, key, value, attention_mask, scaling, topk)
        -> (approx_output (B, Hq, Q, D), approx_scores (B, Hq, Q, K) or None, topk_ids (B, Hq, Q, k))

query (B, Hq, Q, D); key/value (B, Hkv, K, D) (GQA: query head h uses KV head h // (Hq/Hkv)); attention_mask is
bool (B, 1, Q, K), True where the key is visible (causal, padding and sliding window applied).

Beyond that call, a method may declare parameters, keep per-sequence state and report its cost: see contract.py.
"""

from __future__ import annotations

import importlib
from typing import Callable

from ...errors import UserInputError
from .common import exact_attention
from .exact_topk import exact_topk
from .h2o import h2o
from .ivf import ivf
from .loki import loki
from .magicpig import magicpig
from .quest import quest
from .simhash import simhash
from .snapkv import snapkv
from .sparq import sparq
from .streaming import streaming

ApproxFn = Callable[..., tuple]

#: Every built-in method by its `approx=` name; each module's docstring names its paper and states its rule.
BUILTIN: dict[str, ApproxFn] = {
    "exact_topk": exact_topk,
    "simhash": simhash,
    "streaming": streaming,
    "h2o": h2o,
    "snapkv": snapkv,
    "quest": quest,
    "loki": loki,
    "sparq": sparq,
    "magicpig": magicpig,
    "ivf": ivf,
}


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


__all__ = ["BUILTIN", "exact_attention", "resolve_approx", *BUILTIN]
