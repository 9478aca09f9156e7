"""Probes: pure tensor code that looks at one attention call at a time. No model knowledge lives here."""

from __future__ import annotations

import torch

from .hook import AttentionCall


def visible_logits(call: AttentionCall, query: torch.Tensor) -> torch.Tensor:
    """Pre-softmax scores of `query` (B, Hq, Q, D) against the call's keys, masked, grouped per KV head.

    Returns (B, Hkv, G, Q, K) so that each query head is compared with its own KV head's keys and K/V are never
    copied per query head. Masked keys get -inf. A mask of None means plain causal attention over the whole cache,
    aligned bottom-right (the last query sees every key).
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, k_len = call.key.shape[1], call.key.shape[2]
    grouped = query.reshape(batch, kv_heads, q_heads // kv_heads, q_len, dim)
    logits = torch.einsum("bhgqd,bhkd->bhgqk", grouped.float(), call.key.float()) * call.scaling
    mask = call.attention_mask
    if mask is not None:
        mask = mask[..., -q_len:, -k_len:]
        # Masks are (B or 1, 1 or Hq, Q, K); bring them to the grouped layout.
        if mask.shape[1] == 1:
            mask = mask.unsqueeze(1)
        else:
            mask = mask.reshape(mask.shape[0], kv_heads, q_heads // kv_heads, *mask.shape[-2:])
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.float()
    elif q_len > 1:
        offset = k_len - q_len
        rows = torch.arange(q_len, device=logits.device)[:, None] + offset
        cols = torch.arange(k_len, device=logits.device)[None, :]
        logits = logits.masked_fill(cols > rows, float("-inf"))
    return logits


class RetrievalScoreProbe:
    """Records, for the last query of every attention call, each head's top-1 key.

    The key is stored as its distance from the newest key (0 = the query's own position), which stays right for
    sliding-window caches that keep only the most recent keys. Only the last query is looked at, so the prefill can
    run with this probe off at full backend speed and the decode steps cost one (1 x K) score row per head.
    """

    def __init__(self, num_layers: int, num_heads: int) -> None:
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.step_top1: list[torch.Tensor | None] = [None] * num_layers

    def before(self, call: AttentionCall) -> None:
        return None

    def after(self, call: AttentionCall, output: torch.Tensor) -> None:
        logits = visible_logits(call, call.query[:, :, -1:, :])  # (B, Hkv, G, 1, K)
        top1 = logits[0, :, :, 0, :].argmax(dim=-1).reshape(-1)  # (Hq,), batch 1 during detection
        self.step_top1[call.layer] = (call.key.shape[2] - 1) - top1
        return None

    def take_step(self) -> torch.Tensor:
        """The (layers, heads) distances-from-end recorded by the forward pass that just ran, then reset."""
        missing = [i for i, t in enumerate(self.step_top1) if t is None]
        if missing:
            raise RuntimeError(f"attention layers {missing} were not observed during this step")
        result = torch.stack(self.step_top1)  # type: ignore[arg-type]
        self.step_top1 = [None] * self.num_layers
        return result
