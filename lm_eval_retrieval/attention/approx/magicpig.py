"""`magicpig`: LSH *sampling* with an importance-weighted, self-normalised estimate of the attention output.

Paper: Zhuoming Chen, Ranajoy Sadhukhan, Zihao Ye, Yang Zhou, Jianyu Zhang, Niklas Nolte, Yuandong Tian, Matthijs
Douze, Leon Bottou, Zhihao Jia, Beidi Chen, "MagicPIG: LSH Sampling for Efficient LLM Generation", 2024,
arXiv:2410.16179 (rule as in the authors' code: two collisions, keys centred, sinks and a local window exact).

Rule. Once per sequence, when its first call (the prompt) arrives, the keys are centred: the centre is the mean of
the prompt's candidate keys, its tokens but the first `sinks` and the last `window` (per batch row and KV head; zero
with `center=false` or where there is no such key), and every key of the sequence, the prompt's and each decode
step's, is hashed once, centred by it, with SimHash into `tables` codes of `bits` signs each (hyperplanes seeded by
layer). This is the authors' code: it centres its hash tables' keys by the mean of the prefill's keys outside the
sinks and the window when it builds them, and hashes the uncentred query. For each query, its first `sinks` and last
`window` visible keys are attended exactly (the paper keeps 4 sinks and 64 local tokens on the GPU); every other
visible key is a candidate, *sampled* when its code equals the query's in at least `min_collisions` tables (the
authors' threshold is 2). With theta the angle between the query and the centred key, u = 1 - theta/pi is one bit's
chance to agree, u^bits one table's chance to collide, and the sampling probability is p = P(Binomial(tables, u^bits)
>= min_collisions); for min_collisions = 2, p = 1 - (1-u^bits)^tables - tables u^bits (1-u^bits)^(tables-1). The
output is sum_i w_i v_i / sum_i w_i over the static and sampled keys, with w_i = exp(s_i) for a static key and
exp(s_i) / (p_i + p_floor) for a sampled one (s_i the exact, soft-capped score; the authors add p_floor = 1e-4
against huge weights for improbable keys; with p_floor = 0 the numerator and the denominator are each unbiased over
the random hyperplanes). A prompt query is analysed as if it were decoding after the whole prompt had been hashed:
its keys are centred by the prompt's mean, later keys included (a single vector; every later key stays invisible).

Budget. The set MagicPIG attends is not a top-k: its size is set by `bits`/`tables` (and the static part), not by
`topk`, so no default scales with `topk`. The returned ids are the static and sampled keys, padded to a fixed width
(at least min(topk, K)) with an invisible key or a repeat, which the probe counts as nothing; Recall@k is then
|exact top-k ∩ (static ∪ sampled)| / k. Defaults for head dim 64: the paper's 10 bits per table with half its 150
tables (75), i.e. the same hashing budget per dimension, bits x tables / D ~ 12, as its 128-dim heads.

Cost model (key-vector equivalents per query): bits x tables for the query's projections, plus bits x tables / D for
each candidate key whose codes are compared (D bit comparisons counted as one key vector); keys' codes are not charged.

State: the centre and every key's codes and centred norm, kept in `approx_state(module)` and extended by each decode
step's keys. On a CPU each query's collisions, weights and output are one numba pass (`_magicpig_scan.py`) that
computes a probability only for the keys that collide; elsewhere the same rule runs as tensor operations.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ...errors import UserInputError
from .._numba import numba_module
from ..kernel_rows import mask_rows, row_groups, row_kernel
from .common import (
    holds_prefix,
    masked_logits,
    module_softcap,
    padded_ids,
    prefix_fingerprint,
    room_for_decoding,
    shared_scores,
    static_keys,
    weighted_values,
)
from .contract import approx_args, approx_state, method, report_scanned, sequence_tokens

PLANE_SEED = 2410_16179  # hyperplanes: randn(D, tables*bits) from Generator().manual_seed(PLANE_SEED + layer)
BLOCK_ELEMENTS = 2**24  # bound on the (rows x keys x tables) comparison tensor of one block (tensor path)
MAX_BITS = 62  # one table's code is packed into one integer
MAX_TABLES = 32767  # the kernel counts a key's collisions in an int16 (an int8 up to 127 tables)
STATE_KEY = "magicpig"
BUCKET_ROWS = 256  # from this many rows per call (a prompt's), collisions are found through bucketed hash tables
BUCKET_BITS = 12  # up to this many bits per table (2^bits buckets per table)
PARTS_PER_THREAD = 8  # the kernel's rows are cut into this many pieces per thread (see `magicpig_attend`)


def _planes(module: torch.nn.Module, dim: int, count: int, device: torch.device) -> torch.Tensor:
    """The layer's (dim, tables*bits) hyperplanes, column t*bits + j = bit j of table t; drawn once per layer."""
    layer = int(getattr(module, "_lmr_layer", 0))
    key = (dim, count, str(device), layer)
    cached = module.__dict__.get("_magicpig_planes")
    if cached is None or cached[0] != key:
        generator = torch.Generator().manual_seed(PLANE_SEED + layer)
        cached = (key, torch.randn(dim, count, generator=generator).to(device))
        module.__dict__["_magicpig_planes"] = cached
    return cached[1]


def _codes(projections: torch.Tensor, tables: int, bits: int) -> torch.Tensor:
    """(..., tables*bits) projections -> (..., tables) integer codes: bit j of table t set where the projection on
    column t*bits + j is positive (the tensor path's packing; the CPU kernel packs the same bits itself)."""
    signs = (projections > 0).view(*projections.shape[:-1], tables, bits)
    packed = (signs.long() << torch.arange(bits, device=projections.device)).sum(-1)
    return packed.to(_code_dtype(bits))


def _code_dtype(bits: int) -> torch.dtype:
    """As narrow an integer as the bits allow: the kernel compares many keys' codes per vector instruction, and
    int16 fits twice as many as int32."""
    return torch.int16 if bits <= 15 else torch.int32 if bits <= 31 else torch.int64


class _Tables:
    """One sequence's hash tables: the centre of its prompt's candidate keys (B, Hkv, D) float64 and, for every key
    so far, its codes (B, Hkv, tables, >= K), table by table, and its centred norm (B, Hkv, >= K) float64; room is
    kept for the decode steps to come, so that each writes its key's codes in place instead of copying all."""

    def __init__(self, key: torch.Tensor, tokens: torch.Tensor, settings: tuple, planes: torch.Tensor) -> None:
        self.settings, self.planes = settings, planes
        bits, tables, sinks, window, center = settings
        prompt = tokens & ~static_keys(tokens, sinks, window)  # (B, K): the prompt's candidate keys
        batch, kv_heads, _, dim = key.shape
        self.centre = torch.zeros(batch, kv_heads, dim, dtype=torch.float64, device=key.device)
        if center and bool(prompt.any()):
            sums = torch.matmul(prompt.double()[:, None, None, :], key.double()).squeeze(-2)
            self.centre = sums / prompt.sum(-1).clamp(min=1).double()[:, None, None]
        self.codes = torch.empty(batch, kv_heads, tables, 0, dtype=_code_dtype(bits), device=key.device)
        self.norms = torch.empty(batch, kv_heads, 0, dtype=torch.float64, device=key.device)
        self.length = 0
        self.extend(key)

    def extend(self, key: torch.Tensor) -> None:
        """Hash keys self.length..K-1 (a decode step's) with the kept centre."""
        bits, tables = self.settings[:2]
        batch, kv_heads, k_len, _ = key.shape
        if self.codes.shape[-1] < k_len:
            room = room_for_decoding(k_len)
            codes = self.codes.new_empty(batch, kv_heads, tables, room)
            norms = self.norms.new_empty(batch, kv_heads, room)
            codes[..., : self.length] = self.codes[..., : self.length]
            norms[..., : self.length] = self.norms[..., : self.length]
            self.codes, self.norms = codes, norms
        centred = key[:, :, self.length :].float() - self.centre[:, :, None].float()
        projections = centred @ self.planes  # (B, Hkv, new keys, tables * bits)
        kernels = numba_module("approx._magicpig_scan") if key.device.type == "cpu" else None
        if kernels is not None:
            groups = batch * kv_heads
            kernels.pack_key_codes(projections.reshape(groups, -1, tables * bits).contiguous().numpy(), bits,
                                   self.codes.view(groups, tables, -1).numpy(), self.length)  # fmt: skip
        else:
            self.codes[..., self.length : k_len] = _codes(projections, tables, bits).transpose(-1, -2)
        self.norms[:, :, self.length : k_len] = centred.norm(dim=-1)
        self.length = k_len
        self.fingerprint = prefix_fingerprint(key, k_len)
        self._buckets = None

    def buckets(self, kernels, k_len: int, wanted: bool) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
        """The hash tables' buckets over the first k_len keys (`_magicpig_scan.bucket_order`): built once for the
        many rows of a prompt, whose chunks all share them, and dropped when keys are added. Empty (compare every
        candidate) where not `wanted` (a decode step's few rows) or with more than BUCKET_BITS bits per table."""
        bits, tables = self.settings[:2]
        groups = self.codes.shape[0] * self.codes.shape[1]
        if not wanted or bits > BUCKET_BITS:
            return np.empty((groups, tables, 0), dtype=np.int32), np.empty((groups, tables, 1), dtype=np.int32)
        if self._buckets is None or self._buckets[0].shape[-1] != k_len:
            order = np.empty((groups, tables, k_len), dtype=np.int32)
            offsets = np.empty((groups, tables, 2**bits + 1), dtype=np.int32)
            kernels.bucket_order(self.codes.view(groups, tables, -1).numpy(), k_len, order, offsets)
            self._buckets = (order, offsets)
        return self._buckets


def sequence_tables(
    module: torch.nn.Module, key: torch.Tensor, visible: torch.Tensor, settings: tuple, planes: torch.Tensor
) -> _Tables:
    """The hash tables of the module's current sequence: built at its first call, extended when the cache has grown.

    The probe empties the state at each new sequence; kept tables whose hashed prefix is not this key tensor's (a
    caller that did not reset), or that were built with other settings, are built afresh."""
    state = approx_state(module)
    kept: _Tables | None = state.get(STATE_KEY)
    k_len = key.shape[2]
    if kept is not None and (
        kept.settings != settings or kept.planes is not planes or not holds_prefix(kept.fingerprint, kept.length, key)
    ):
        kept = None
    if kept is None:
        kept = state[STATE_KEY] = _Tables(key, sequence_tokens(module, visible), settings, planes)
    elif kept.length < k_len:
        kept.extend(key)
    return kept


def collision_probability(cosine: torch.Tensor, bits: int, tables: int, min_collisions: int) -> torch.Tensor:
    """P(Binomial(tables, u^bits) >= min_collisions), u = 1 - arccos(cosine)/pi: the chance a key is sampled."""
    agree = 1 - torch.arccos(cosine.double().clamp(-1, 1)) / math.pi
    hit = agree.pow(bits)
    log_miss = torch.log1p(-hit)  # -inf where hit = 1, handled below
    below = torch.zeros_like(hit)
    for count in range(min(min_collisions, tables + 1)):  # P(X = count) for count < min_collisions
        term = torch.exp(_log_choose(tables, count) + (tables - count) * log_miss) * hit.pow(count)
        below = below + torch.where(hit >= 1, float(count == tables), term)
    return (1 - below).clamp(min=0.0, max=1.0)


def _log_choose(n: int, c: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(c + 1) - math.lgamma(n - c + 1)


def _grouped(rows: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, Hq, Q, X) -> (B, Hkv, G*Q, X): the rows of each KV head's query group, in `repeat_kv` order."""
    batch, q_heads, q_len, width = rows.shape
    return rows.reshape(batch, kv_heads, (q_heads // kv_heads) * q_len, width)


def _per_query_head(rows: torch.Tensor, q_heads: int) -> torch.Tensor:
    """(B, Hkv, ...) -> (B, Hq, ...): each query head's KV head's rows."""
    return rows.repeat_interleave(q_heads // rows.shape[1], dim=1)


@method(bits=10, tables=75, min_collisions=2, sinks=4, window=64, center=True, p_floor=1e-4)
def magicpig(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float,
    topk: int,
) -> tuple[torch.Tensor, None, torch.Tensor]:
    args = approx_args(module, magicpig)
    bits, tables = int(args["bits"]), int(args["tables"])
    if not 0 < bits <= MAX_BITS or not 0 < tables <= MAX_TABLES:
        raise UserInputError(f"approx=magicpig needs 1 <= bits <= {MAX_BITS} and 1 <= tables <= {MAX_TABLES}, "
                             f"got bits={bits}, tables={tables}")  # fmt: skip
    sinks, window = max(0, int(args["sinks"])), max(0, int(args["window"]))
    batch, q_heads, q_len, dim = query.shape
    k_len = key.shape[2]
    visible = attention_mask.expand(batch, -1, q_len, k_len)
    planes = _planes(module, dim, bits * tables, query.device)
    hashed = sequence_tables(module, key, visible, (bits, tables, sinks, window, bool(args["center"])), planes)
    query_proj = query.float() @ planes  # (B, Hq, Q, tables * bits): the queries' codes are its signs
    rule = (sinks, window, int(args["min_collisions"]), float(args["p_floor"]), bits, tables)
    kernels = numba_module("approx._magicpig_scan") if query.device.type == "cpu" else None
    if kernels is not None:
        output, ids, candidates = _sample_kernel(
            kernels, module, query, query_proj, key, value, attention_mask, hashed, scaling, topk, rule
        )
    else:
        output, ids, candidates = _sample_tensors(
            module, query, _codes(query_proj, tables, bits), key, value, visible, hashed, scaling, topk, rule
        )
    report_scanned(module, bits * tables * (1.0 + candidates.double() / dim))
    return output, None, ids


def _sample_tensors(  # type: ignore[no-untyped-def]
    module, query, query_codes, key, value, visible, hashed: _Tables, scaling, topk, rule: tuple
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rule as tensor operations over every (query, key) pair (off the CPU). Returns (output, ids, candidates
    per query)."""
    sinks, window, least, floor, bits, tables = rule
    batch, q_heads, q_len, _ = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    static = static_keys(visible, sinks, window)
    candidates = (visible & ~static).expand(batch, q_heads, q_len, k_len)
    key_codes = hashed.codes[..., :k_len].transpose(-1, -2)  # (B, Hkv, K, tables)
    sampled = candidates & (_collisions(query_codes, key_codes, kv_heads) >= least)
    q64 = query.double()
    dots = torch.matmul(_grouped(q64, kv_heads), key.double().transpose(-1, -2)).view(batch, q_heads, q_len, k_len)
    query_centre = (q64 * _per_query_head(hashed.centre, q_heads)[:, :, None]).sum(-1, keepdim=True)
    norms = _per_query_head(hashed.norms[:, :, :k_len], q_heads)[:, :, None] * q64.norm(dim=-1, keepdim=True)
    cosines = (dots - query_centre) / norms.clamp(min=1e-300)
    probability = collision_probability(cosines, bits, tables, least)
    logits = masked_logits(query, key, visible, scaling, module_softcap(module)).double()
    log_weight = torch.where(sampled, logits - torch.log(probability + floor), float("-inf"))
    log_weight = torch.where(static.expand_as(log_weight), logits, log_weight)
    weights = torch.softmax(log_weight, dim=-1).nan_to_num(0.0).float()  # a row that sees nothing gets 0
    chosen = sampled | static
    width = max(min(topk, k_len), int(chosen.sum(-1).max()) if chosen.numel() else 0, 1)
    ids, _ = padded_ids(chosen, visible, min(width, k_len))
    return weighted_values(weights, value), ids, candidates.sum(-1)


def _collisions(query_codes: torch.Tensor, key_codes: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, Hq, Q, K) int32: in how many tables each query's code equals each key's; rows go in blocks that bound the
    comparison tensor to BLOCK_ELEMENTS."""
    batch, q_heads, q_len, tables = query_codes.shape
    k_len = key_codes.shape[2]
    grouped = _grouped(query_codes, kv_heads)
    rows = grouped.shape[2]
    counts = torch.empty(batch, kv_heads, rows, k_len, dtype=torch.int32, device=query_codes.device)
    block = max(1, BLOCK_ELEMENTS // max(1, batch * kv_heads * k_len * tables))
    for start in range(0, rows, block):
        end = min(rows, start + block)
        agree = grouped[:, :, start:end, None] == key_codes[:, :, None]  # (B, Hkv, r, K, tables)
        counts[:, :, start:end] = agree.sum(-1, dtype=torch.int32)
    return counts.view(batch, q_heads, q_len, k_len)


_CHOSEN: list[torch.Tensor] = []  # the one buffer every call's chosen ids go to (see `_chosen_buffer`)


def _chosen_buffer(rows: int, k_len: int) -> torch.Tensor:
    """Room for each row's chosen ids, (rows, K) int32, reused from call to call: a fresh 30 MB buffer per prompt
    chunk cost a page fault for each row that wrote into it, as much as the rows' own work. The probe bounds a
    chunk's rows x keys, so the buffer stays that size."""
    if not _CHOSEN or _CHOSEN[0].numel() < rows * k_len:
        _CHOSEN[:] = [torch.empty(rows * k_len, dtype=torch.int32)]
    return _CHOSEN[0][: rows * k_len].view(rows, k_len)


def _probe_scores(module: torch.nn.Module, query: torch.Tensor, rows: int) -> np.ndarray:
    """The probe's exact scores of this chunk (R, W) (`common.shared_scores`) where it has them and the model does
    not soft-cap (the kernel then reads each key's dot product back as score / scaling), else (R, 0)."""
    scores = shared_scores(module, query)
    if scores is None or module_softcap(module):
        return np.empty((rows, 0), dtype=np.float32)
    return scores.reshape(rows, scores.shape[-1]).contiguous().numpy()


def _sample_kernel(  # type: ignore[no-untyped-def]
    kernels, module, query, query_proj, key, value, attention_mask, hashed: _Tables, scaling, topk, rule: tuple
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CPU path: see the module docstring and `_magicpig_scan.magicpig_attend`."""
    sinks, window, least, floor, bits, tables = rule
    batch, q_heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    rows, groups = batch * q_heads * q_len, batch * kv_heads
    mask_heads = attention_mask.shape[1]
    mask = attention_mask.expand(batch, mask_heads, q_len, k_len).reshape(-1, k_len).contiguous()
    counts, row_end = np.empty(mask.shape[0], dtype=np.int64), np.empty(mask.shape[0], dtype=np.int64)
    chosen = _chosen_buffer(rows, k_len)
    chosen_count, candidates, filler = (torch.empty(rows, dtype=torch.int64) for _ in range(3))
    out = torch.empty(rows, value.shape[-1])
    log_choose = np.array([_log_choose(tables, c) for c in range(min(least, tables + 1))], dtype=np.float64)
    key_codes = hashed.codes.view(groups, tables, -1).numpy()
    row_kernel(kernels, "magicpig_attend", rows)(
        query.float().reshape(rows, dim).contiguous().numpy(), query_proj.reshape(rows, -1).contiguous().numpy(),
        hashed.centre.reshape(groups, dim).contiguous().numpy(), key_codes,
        *hashed.buckets(kernels, k_len, rows >= BUCKET_ROWS),
        key.float().contiguous().view(groups, k_len, dim).numpy(), hashed.norms.view(groups, -1).numpy(),
        value.float().contiguous().view(groups, k_len, -1).numpy(), row_groups(batch, q_heads, kv_heads, q_len),
        mask.numpy(), mask_rows(batch, q_heads, q_len, mask_heads), counts, row_end, sinks, window, least, log_choose,
        bits, float(scaling), float(module_softcap(module) or 0.0), floor,
        np.empty(1, dtype=np.int8 if tables <= 127 else np.int16), chosen.numpy(), chosen_count.numpy(),
        candidates.numpy(), filler.numpy(), _probe_scores(module, query, rows), out.numpy(),
        PARTS_PER_THREAD * torch.get_num_threads(),
    )  # fmt: skip
    width = min(k_len, max(min(topk, k_len), int(chosen_count.max()) if rows else 0, 1))
    ids = torch.empty(rows, width, dtype=torch.int64)
    kernels.padded_ids(chosen.numpy(), chosen_count.numpy(), filler.numpy(), ids.numpy())
    shape = (batch, q_heads, q_len)
    return out.view(*shape, -1), ids.view(*shape, width), candidates.view(shape)
