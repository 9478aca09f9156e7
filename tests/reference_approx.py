"""A slow, independent reference for the approximation metrics: fp64, one query and one head at a time.

It is handed the raw q/k/v of each attention call and builds visibility itself from the token positions, the
batch's 2D padding mask and the layer's sliding window, never from the mask the model built.
"""

from __future__ import annotations

import math

import torch

FIELDS = ("recall", "error_norm", "exact_topk_mass", "approx_topk_mass")


def reference_stats(calls, padding, total_lengths, windows, topk, min_keys, approx_fn=None, softcap=None):
    """calls: dicts with layer, module, query, key, value, scaling, and `step` (index into total_lengths).

    padding: (B, T) 1 = real token. total_lengths[step]: tokens processed once that forward pass is done.
    windows[layer]: sliding window or None. topk: k, or a function of a query's visible key count. approx_fn: None = exact top-k; else the approximation, called on
    per-query fp64 inputs with a mask built here.
    Returns {field: {(layer, head): mean}} and {(layer, head): count}.
    """
    sums: dict = {f: {} for f in FIELDS}
    counts: dict = {}
    for call in calls:
        q, k, v = call["query"].double(), call["key"].double(), call["value"].double()
        batch, q_heads, q_len, dim = q.shape
        kv_heads, k_len = k.shape[1], k.shape[2]
        total = total_lengths[call["step"]]
        window = windows[call["layer"]]
        for b in range(batch):
            for i in range(q_len):
                q_pos = total - q_len + i
                if not padding[b, q_pos]:
                    continue
                key_pos = [total - k_len + j for j in range(k_len)]
                visible = [
                    kp <= q_pos and bool(padding[b, kp]) and (window is None or q_pos - kp < window) for kp in key_pos
                ]
                ids_visible = [j for j in range(k_len) if visible[j]]
                if len(ids_visible) < min_keys:
                    continue
                for h in range(q_heads):
                    kv = h // (q_heads // kv_heads)
                    scores = {j: float(q[b, h, i] @ k[b, kv, j]) * call["scaling"] for j in ids_visible}
                    if softcap:
                        scores = {j: softcap * math.tanh(s / softcap) for j, s in scores.items()}
                    top = max(scores.values())
                    weights = {j: math.exp(s - top) for j, s in scores.items()}
                    norm = sum(weights.values())
                    probs = {j: w / norm for j, w in weights.items()}
                    exact_out = sum(probs[j] * v[b, kv, j] for j in ids_visible)
                    budget = topk(len(ids_visible)) if callable(topk) else topk  # a share: k from the visible keys
                    kk = min(budget, len(ids_visible))
                    exact_ids = sorted(ids_visible, key=lambda j: -scores[j])[:kk]
                    if approx_fn is None:
                        approx_ids = exact_ids
                        sub = {j: weights[j] for j in approx_ids}
                        z = sum(sub.values())
                        approx_out = sum(sub[j] / z * v[b, kv, j] for j in approx_ids)
                    else:
                        mask = torch.tensor(visible).view(1, 1, 1, k_len)
                        out, _, ids = approx_fn(
                            call["module"], call["query"][b : b + 1, :, i : i + 1], call["key"][b : b + 1],
                            call["value"][b : b + 1], mask,
                            call["scaling"], budget,
                        )
                        approx_ids = [int(x) for x in ids[0, h, 0] if visible[int(x)]]
                        approx_out = out[0, h, 0].double()
                    recall = len(set(exact_ids) & set(approx_ids)) / kk
                    error = float((approx_out - exact_out).norm() / exact_out.norm())
                    values = {
                        "recall": recall,
                        "error_norm": error,
                        "exact_topk_mass": sum(probs[j] for j in exact_ids),
                        "approx_topk_mass": sum(probs[j] for j in set(approx_ids)),
                    }
                    key = (call["layer"], h)
                    counts[key] = counts.get(key, 0) + 1
                    for field in FIELDS:
                        sums[field][key] = sums[field].get(key, 0.0) + values[field]
    means = {f: {key: sums[f][key] / counts[key] for key in counts} for f in FIELDS}
    return means, counts
