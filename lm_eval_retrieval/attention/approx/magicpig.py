"""`magicpig`: LSH *sampling* with an importance-weighted, self-normalised estimate of the attention output.

Paper: Zhuoming Chen, Ranajoy Sadhukhan, Zihao Ye, Yang Zhou, Jianyu Zhang, Niklas Nolte, Yuandong Tian, Matthijs
Douze, Leon Bottou, Zhihao Jia, Beidi Chen, "MagicPIG: LSH Sampling for Efficient LLM Generation", 2024,
arXiv:2410.16179 (rule as in the authors' code: two collisions, keys centred, sinks and a local window exact).

Rule, per query. The first `sinks` and the last `window` keys it sees are attended exactly (the paper keeps 4 sinks and
64 local tokens on the GPU). Every other visible key is a candidate: it is centred by the mean of the query's candidate
keys (the paper centres the keys of its hash tables by their mean), hashed with SimHash into `tables` codes of `bits`
signs each (hyperplanes seeded by layer), and *sampled* when its code equals the query's code in at least
`min_collisions` tables (the authors' threshold is 2). With theta the angle between the query and the centred key,
u = 1 - theta/pi is one bit's chance to agree, u^bits one table's chance to collide, and the sampling probability is
p = P(Binomial(tables, u^bits) >= min_collisions); for min_collisions = 2, p = 1 - (1-u^bits)^tables -
tables u^bits (1-u^bits)^(tables-1). The output is sum_i w_i v_i / sum_i w_i over the static and sampled keys, with
w_i = exp(s_i) for a static key and exp(s_i) / (p_i + p_floor) for a sampled one (s_i the exact, soft-capped score;
the authors add p_floor = 1e-4 against huge weights for improbable keys; with p_floor = 0 the numerator and the
denominator are each unbiased over the random hyperplanes).

Budget. The set MagicPIG attends is not a top-k: its size is set by `bits`/`tables` (and the static part), not by
`topk`, so no default scales with `topk`. The returned ids are the static and sampled keys, padded to a fixed width
(at least min(topk, K)) with an invisible key or a repeat, which the probe counts as nothing; Recall@k is then
|exact top-k ∩ (static ∪ sampled)| / k. Defaults for head dim 64: the paper's 10 bits per table with half its 150
tables (75), i.e. the same hashing budget per dimension, bits x tables / D ~ 12, as its 128-dim heads.

Cost model (key-vector equivalents per query): bits x tables for the query's projections, plus bits x tables / D for
each candidate key whose codes are compared (D bit comparisons counted as one key vector); keys' codes are not charged.
Speed: per-query centring gives every (query, key) pair its own codes, O(Q x K x bits x tables) comparisons per call:
cheap for decode steps, slow for long prefills on a CPU (about 3.5 s for 128 queries x 512 keys x 9 heads).
"""

from __future__ import annotations

import math

import torch

from .common import masked_logits, module_softcap, padded_ids, static_keys, weighted_values
from .contract import approx_args, method, report_scanned

PLANE_SEED = 2410_16179  # hyperplanes: randn(D, tables*bits) from Generator().manual_seed(PLANE_SEED + layer)
BLOCK_ELEMENTS = 2**24  # bound on the (rows x keys x hash bits) comparison tensor of one block


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


def _grouped(rows: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, Hq, Q, X) -> (B, Hkv, G*Q, X): the rows of each KV head's query group, in `repeat_kv` order."""
    batch, q_heads, q_len, width = rows.shape
    return rows.reshape(batch, kv_heads, (q_heads // kv_heads) * q_len, width)


def _centres(candidates: torch.Tensor, key: torch.Tensor, enabled: bool) -> torch.Tensor:
    """(B, Hq, Q, D) float64: each row's mean candidate key (zeros when centring is off or nothing is a candidate)."""
    batch, q_heads, q_len, _ = candidates.shape
    if not enabled:
        return torch.zeros(batch, q_heads, q_len, key.shape[-1], dtype=torch.float64, device=key.device)
    weights = _grouped(candidates.double(), key.shape[1])
    sums = torch.matmul(weights, key.double()).view(batch, q_heads, q_len, -1)
    return sums / candidates.sum(-1, keepdim=True).clamp(min=1)


def _collisions(query: torch.Tensor, key: torch.Tensor, centres: torch.Tensor, planes: torch.Tensor, bits: int):
    """(B, Hq, Q, K) int: in how many tables the query's code equals the centred key's code.

    Bit j of table t is the sign of the projection on column t*bits + j; a centred key's projection is
    key @ planes - centre @ planes, so one (keys x hash bits) projection serves every row. Rows go in blocks that
    bound the comparison tensor to BLOCK_ELEMENTS.
    """
    batch, q_heads, q_len, _ = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    width = planes.shape[1]
    query_bits = _grouped(query.float() @ planes > 0, kv_heads)  # (B, Hkv, R, TB)
    centre_proj = _grouped((centres @ planes.double()).float(), kv_heads)  # (B, Hkv, R, TB)
    key_proj = key.float() @ planes  # (B, Hkv, K, TB)
    rows = query_bits.shape[2]
    block = max(1, BLOCK_ELEMENTS // max(1, batch * kv_heads * k_len * width))
    counts = torch.empty(batch, kv_heads, rows, k_len, dtype=torch.int32, device=query.device)
    for start in range(0, rows, block):
        end = min(rows, start + block)
        key_bits = key_proj[:, :, None] > centre_proj[:, :, start:end, None]  # (B, Hkv, r, K, TB)
        agree = key_bits == query_bits[:, :, start:end, None]
        tables = agree.view(batch, kv_heads, end - start, k_len, width // bits, bits).all(-1)
        counts[:, :, start:end] = tables.sum(-1, dtype=torch.int32)
    return counts.view(batch, q_heads, q_len, k_len)


def collision_probability(cosine: torch.Tensor, bits: int, tables: int, min_collisions: int) -> torch.Tensor:
    """P(Binomial(tables, u^bits) >= min_collisions), u = 1 - arccos(cosine)/pi: the chance a key is sampled."""
    agree = 1 - torch.arccos(cosine.double().clamp(-1, 1)) / math.pi
    hit = agree.pow(bits)
    log_miss = torch.log1p(-hit)  # -inf where hit = 1, handled below
    below = torch.zeros_like(hit)
    for count in range(min(min_collisions, tables + 1)):  # P(X = count) for count < min_collisions
        log_choose = math.lgamma(tables + 1) - math.lgamma(count + 1) - math.lgamma(tables - count + 1)
        term = torch.exp(log_choose + (tables - count) * log_miss) * hit.pow(count)
        below = below + torch.where(hit >= 1, float(count == tables), term)
    return (1 - below).clamp(min=0.0, max=1.0)


def _cosines(query: torch.Tensor, key: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(B, Hq, Q, K) float64: cosine of the angle between each query and each key centred by the row's centre."""
    batch, q_heads, q_len, _ = query.shape
    kv_heads = key.shape[1]
    q64, k64 = query.double(), key.double()
    q_dot_k = _group_matmul(q64, k64, kv_heads)
    c_dot_k = _group_matmul(centres, k64, kv_heads)
    q_dot_c = (q64 * centres).sum(-1, keepdim=True)
    key_sq = (k64 * k64).sum(-1)  # (B, Hkv, K)
    key_sq = key_sq.repeat_interleave(q_heads // kv_heads, dim=1)[:, :, None, :]
    centred_sq = (key_sq - 2 * c_dot_k + (centres * centres).sum(-1, keepdim=True)).clamp(min=0)
    norms = q64.norm(dim=-1, keepdim=True) * centred_sq.sqrt()
    return ((q_dot_k - q_dot_c) / norms.clamp(min=1e-300)).view(batch, q_heads, q_len, -1)


def _group_matmul(rows: torch.Tensor, key: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """rows (B, Hq, Q, D) against each row's KV head's keys (B, Hkv, K, D) -> (B, Hq, Q, K), same dtype."""
    batch, q_heads, q_len, _ = rows.shape
    grouped = _grouped(rows, kv_heads)
    return torch.matmul(grouped, key.transpose(-1, -2)).view(batch, q_heads, q_len, -1)


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
    batch, q_heads, q_len, dim = query.shape
    k_len = key.shape[2]
    visible = attention_mask.expand(batch, -1, q_len, k_len)
    static = static_keys(visible, int(args["sinks"]), int(args["window"]))
    candidates = (visible & ~static).expand(batch, q_heads, q_len, k_len)
    centres = _centres(candidates, key, bool(args["center"]))
    planes = _planes(module, dim, bits * tables, query.device)
    collisions = _collisions(query, key, centres, planes, bits)
    sampled = candidates & (collisions >= int(args["min_collisions"]))
    probability = collision_probability(_cosines(query, key, centres), bits, tables, int(args["min_collisions"]))
    logits = masked_logits(query, key, visible, scaling, module_softcap(module)).double()
    log_weight = torch.where(sampled, logits - torch.log(probability + float(args["p_floor"])), float("-inf"))
    log_weight = torch.where(static.expand_as(log_weight), logits, log_weight)
    weights = torch.softmax(log_weight, dim=-1).nan_to_num(0.0).float()  # a row that sees nothing gets 0
    output = weighted_values(weights, value)
    chosen = sampled | static
    width = max(min(topk, k_len), int(chosen.sum(-1).max()) if chosen.numel() else 0, 1)
    ids, _ = padded_ids(chosen, visible, min(width, k_len))
    report_scanned(module, bits * tables * (1.0 + candidates.sum(-1).double() / dim))
    return output, None, ids
