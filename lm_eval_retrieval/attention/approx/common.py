"""Tensor helpers shared by the approximations and the approximation probe.

Shapes: query (B, Hq, Q, D); key/value (B, Hkv, K, D); a visibility mask is bool (B, 1 or Hq, Q, K), True where the
key may be attended (causal, padding and sliding window already applied). Query head h uses KV head h // (Hq/Hkv),
the order of transformers' `repeat_kv`; K/V are never copied per query head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from .._numba import numba_module
from ..kernel_rows import row_groups, row_kernel


def masked_logits(
    query: torch.Tensor, key: torch.Tensor, visible: torch.Tensor | None, scaling: float, softcap: float | None = None
) -> torch.Tensor:
    """Pre-softmax scores (B, Hq, Q, K) in float32, -inf where a key is not visible (`visible=None`: no masking).

    `softcap` is the attention logit soft-capping some models apply (Gemma2: softcap * tanh(s / softcap)); the hook
    records it per call as `module._lmr_softcap`, see `module_softcap`.
    """
    logits = soft_capped(scores_against(query, key.float().transpose(-1, -2), scaling), softcap)
    return logits if visible is None else logits.masked_fill_(~visible, float("-inf"))


def chunk_logits(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    visible: torch.Tensor,
    scaling: float,
    softcap: float | None,
) -> torch.Tensor:
    """`masked_logits` of this call, or, where the probe has scored this very chunk for its exact reference (it
    shares them with `sharing_chunk_logits`), those scores: read-only, and only as wide as the chunk's last query's
    key (B, Hq, Q, limit <= K), every later key being invisible to every row. Methods whose own rule is an exact
    softmax over every key (`h2o`, `snapkv`) then do not score every key a second time."""
    shared = module.__dict__.get("_lmr_chunk_logits")
    if shared is not None and shared[0] is query and shared[1] is visible:
        return shared[2]()
    return masked_logits(query, key, visible, scaling, softcap)


@contextlib.contextmanager
def sharing_chunk_logits(
    module: torch.nn.Module,
    query: torch.Tensor,
    visible: torch.Tensor,
    logits: Callable[[], torch.Tensor],
    raw: torch.Tensor | None = None,
    causal_first: int | None = None,
) -> Iterator[None]:
    """While the probe calls a method on a chunk, `chunk_logits` of that (query, visible) pair returns `logits()`
    (a callable, so that the probe's scores are masked only if a method reads them); `shared_scores` of that query
    returns `raw`: the same scores, possibly unmasked, which are exact wherever a key is visible; and
    `shared_causal_first` returns `causal_first` where the chunk is plainly causal: query i sees keys 0 ..
    causal_first + i, and only those."""
    module.__dict__["_lmr_chunk_logits"] = (query, visible, logits, raw, causal_first)
    try:
        yield
    finally:
        module.__dict__.pop("_lmr_chunk_logits", None)


def shared_scores(module: torch.nn.Module, query: torch.Tensor) -> torch.Tensor | None:
    """The probe's exact scores of `query` (B, Hq, Q, W) when it is analysing this very chunk, else None (nothing
    is computed). Read-only; exact for every key the chunk's queries see (W is one past the last such key), not
    masked otherwise: a method passes them to `attend_valid` so that the keys it picked are not scored again."""
    shared = module.__dict__.get("_lmr_chunk_logits")
    return shared[3] if shared is not None and shared[0] is query else None


def shared_causal_first(module: torch.nn.Module, query: torch.Tensor) -> int | None:
    """Where the probe is analysing this very chunk and its mask is plain causal attention (no padding, no window):
    the key the chunk's first query sees last (query i sees keys 0 .. that + i). A method may then give its top-k
    `causal_first` instead of masking its scores (a pass over every (query, key) pair). None otherwise."""
    shared = module.__dict__.get("_lmr_chunk_logits")
    return shared[4] if shared is not None and shared[0] is query else None


def seen_width(attention_mask: torch.Tensor, at_least: int = 1) -> int:
    """One past the last key any query of this call may see (at least `at_least`, at most every key): a causal
    chunk's later keys are invisible to all its rows, so a method that scores keys need not score them."""
    seen = attention_mask.flatten(0, -2).any(0).nonzero()
    width = int(seen[-1]) + 1 if seen.numel() else 1
    return min(attention_mask.shape[-1], max(width, at_least))


def soft_capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """`softcap * tanh(scores / softcap)` where the model soft-caps its attention logits (Gemma2), else `scores`."""
    return torch.tanh(scores / softcap).mul_(softcap) if softcap else scores


def scores_against(
    query: torch.Tensor, key_t: torch.Tensor, scaling: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Scaled scores (B, Hq, Q, K) float32 of `query` against transposed keys `key_t` (B, Hkv, D, K) float32.

    One batched matmul per KV head over all its query heads' rows: K/V are never copied per query head. `out`, a
    flat float32 buffer of at least B x Hq x Q x K elements, takes the scores (a caller that scores many chunks
    reuses one buffer instead of touching fresh memory each time).
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, k_len = key_t.shape[1], key_t.shape[-1]
    grouped = (query.float() * scaling).reshape(batch, kv_heads, (q_heads // kv_heads) * q_len, dim)
    if out is None:
        return torch.matmul(grouped, key_t).view(batch, q_heads, q_len, k_len)
    target = out[: batch * q_heads * q_len * k_len].view(batch, kv_heads, (q_heads // kv_heads) * q_len, k_len)
    torch.matmul(grouped, key_t, out=target)
    return target.view(batch, q_heads, q_len, k_len)


def module_softcap(module: torch.nn.Module) -> float | None:
    """The logit soft-capping of the attention call the module is in (None for most models)."""
    return getattr(module, "_lmr_softcap", None)


def weighted_values(weights: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """weights (B, Hq, Q, K) @ value (B, Hkv, K, D) per KV group -> (B, Hq, Q, D) in float32."""
    batch, q_heads, q_len, k_len = weights.shape
    kv_heads = value.shape[1]
    grouped = weights.reshape(batch, kv_heads, (q_heads // kv_heads) * q_len, k_len)
    return torch.matmul(grouped, value.float()).view(batch, q_heads, q_len, -1)


def attend_over_ids(logits: torch.Tensor, ids: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Softmax restricted to the keys `ids` (B, Hq, Q, k) of `logits`, applied to their values -> (B, Hq, Q, D).

    Ids that point at invisible keys carry -inf and get no weight; a query whose ids are all invisible gets 0.
    """
    return weighted_ids(torch.softmax(logits.gather(-1, ids), dim=-1).nan_to_num(0.0), ids, value)


def weighted_ids(weights: torch.Tensor, ids: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Sum of the values at `ids` (B, Hq, Q, k) with `weights` of the same shape -> (B, Hq, Q, D)."""
    picked = picked_rows(value, ids).float()
    return torch.matmul(weights.unsqueeze(-2), picked).squeeze(-2)


def picked_rows(rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The key or value rows (B, Hkv, K, D) at `ids` (B, Hq, Q, k), per query head -> (B, Hq, Q, k, D)."""
    batch, q_heads, q_len, k = ids.shape
    kv_heads, k_len, dim = rows.shape[1], rows.shape[2], rows.shape[-1]
    if rows.is_contiguous():  # whole rows copied by one index_select: several times faster than an expanded gather
        offsets = torch.arange(batch * kv_heads, device=ids.device).view(batch, kv_heads, 1) * k_len
        flat = (ids.reshape(batch, kv_heads, -1) + offsets).reshape(-1)
        return rows.view(-1, dim).index_select(0, flat).view(batch, q_heads, q_len, k, dim)
    flat_ids = ids.reshape(batch, kv_heads, -1, 1).expand(-1, -1, -1, dim)
    return rows.gather(2, flat_ids).reshape(batch, q_heads, q_len, k, dim)


def attend_over_picked(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor,
    ids: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Exact softmax attention restricted to the keys `ids` (B, Hq, Q, k) -> (B, Hq, Q, D).

    Scores only the k picked keys, so a retriever that chose k of L keys pays O(k), not O(L), for its output.
    Invisible ids get no weight; a query whose ids are all invisible gets 0.
    """
    return attend_valid(query, key, value, ids, visible.expand(*ids.shape[:3], -1).gather(-1, ids), scaling, softcap)


def attend_valid(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ids: torch.Tensor,
    valid: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact softmax attention over the slots of `ids` (B, Hq, Q, k) where `valid` -> (B, Hq, Q, D) float32; a row
    with no valid slot gets 0. On a CPU one numba pass per row (`_attend_scan.py`) reads the picked keys in place.

    `scores` (B, Hq, Q, W), where the caller has them (`shared_scores`): the exact scaled, soft-capped scores of
    the queries against every key a valid slot can name; each picked key is then read from them instead of being
    scored again (a dot product per key, and copies of the query and keys)."""
    kernels = numba_module("approx._attend_scan") if query.device.type == "cpu" else None
    batch, q_heads, q_len, dim = query.shape
    if scores is not None and scores.shape[:3] != ids.shape[:3]:
        scores = None
    if kernels is None:
        if scores is not None:
            picked = scores.gather(-1, ids.clamp(max=scores.shape[-1] - 1))
        else:
            picked = torch.matmul(picked_rows(key, ids).float(), (query.float() * scaling).unsqueeze(-1)).squeeze(-1)
            picked = soft_capped(picked, softcap)
        weights = torch.softmax(picked.masked_fill_(~valid, float("-inf")), dim=-1).nan_to_num_(0.0)
        return weighted_ids(weights, ids, value)
    kv_heads, k_len = key.shape[1], key.shape[2]
    rows, k = batch * q_heads * q_len, ids.shape[-1]
    out = torch.empty(rows, value.shape[-1])
    groups = row_groups(batch, q_heads, kv_heads, q_len)
    values = value.float().contiguous().view(batch * kv_heads, k_len, -1).numpy()
    flat_ids = ids.reshape(rows, k).contiguous().numpy()
    flat_valid = valid.expand(ids.shape).reshape(rows, k).contiguous().numpy()
    if scores is not None:
        flat_scores = scores.float().reshape(rows, scores.shape[-1]).contiguous().numpy()
        row_kernel(kernels, "attend_scored", rows)(flat_scores, values, groups, flat_ids, flat_valid, out.numpy())
        return out.view(batch, q_heads, q_len, -1)
    row_kernel(kernels, "attend_ids", rows)(
        query.float().reshape(rows, dim).contiguous().numpy(),
        key.float().contiguous().view(batch * kv_heads, k_len, dim).numpy(), values, groups, flat_ids, flat_valid,
        float(scaling), float(softcap or 0.0), out.numpy(),
    )  # fmt: skip
    return out.view(batch, q_heads, q_len, -1)


def exact_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float,
    topk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact attention in the approximation contract: (output, softmax scores, exact top-k ids).

    Installed as `module._attn`, so the seed's `module._approx_attn = MethodType(module._attn, module)` makes the
    "approximation" exact: recall 1 and error norm 0.
    """
    logits = masked_logits(query, key, attention_mask, scaling, module_softcap(module))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    k = min(topk or 1, logits.shape[-1])
    return weighted_values(probs, value), probs, logits.topk(k, dim=-1).indices


def room_for_decoding(k_len: int) -> int:
    """How many keys a per-sequence buffer sized now for k_len keys holds (simhash's codes, magicpig's tables): room
    for the decode steps to come, so that each writes its key in place instead of copying all the kept ones."""
    return k_len + max(64, k_len // 8)


def prefix_fingerprint(key: torch.Tensor, length: int) -> torch.Tensor:
    """The first and the `length`-th key of every (row, head) of key (B, Hkv, K, D): what a method that keeps
    something built from a sequence's first `length` keys (an index, hash codes) remembers to notice, with
    `holds_prefix`, a call that brings another sequence."""
    return key[:, :, [0, length - 1]].detach().float().clone()


def holds_prefix(fingerprint: torch.Tensor, length: int, key: torch.Tensor) -> bool:
    """Whether state built from `length` keys with this `prefix_fingerprint` still describes `key`'s first keys:
    the same rows and heads, at least as many keys now, the same first and `length`-th key. The probe empties the
    state at each new sequence; this guards callers that do not reset (a direct call with another sequence)."""
    return (
        length <= key.shape[2]
        and fingerprint.shape[:2] == key.shape[:2]
        and torch.equal(fingerprint, prefix_fingerprint(key, length))
    )


def static_keys(visible: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Bool like `visible`: each row's first `sinks` and last `window` visible keys (the static keys that MagicPIG and
    RetrievalAttention attend exactly)."""
    rank = visible.long().cumsum(-1)  # 1-based rank of each visible key from the start
    from_end = rank[..., -1:] - rank + 1  # 1-based rank from the end
    return visible & ((rank <= sinks) | (from_end <= window))


def padded_ids(chosen: torch.Tensor, visible: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids (B, Hq, Q, width) of the chosen keys, first, then filler; and which slots are chosen.

    A filler slot holds an invisible key where the row has one, else a repeat of the row's first id: the probe counts
    both as nothing.
    """
    ids = chosen.float().topk(width, dim=-1).indices
    taken = chosen.gather(-1, ids)
    hidden = ~visible.expand_as(chosen)
    filler = torch.where(hidden.any(-1), hidden.float().argmax(-1), ids[..., 0])
    return torch.where(taken, ids, filler[..., None]), taken
