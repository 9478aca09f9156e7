"""A DuoAttention-style split of retrieval and streaming heads (`scores=distant`), over the decode steps of a document.

Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads"
(arXiv 2410.10819). A streaming head attends only to the attention sinks (the first `sink_tokens` keys) and the recent
window (the last `recent_tokens` keys, the query's own included), which is all the KV cache DuoAttention keeps for it
(github.com/mit-han-lab/duo-attention at commit fe93c31, `duo_attn/patch/streaming_attn.py` lines 15-23,
`generate_streaming_mask`: query i sees key j when j < sink_size or j > i - recent_size). The paper finds its heads
by optimising a gate per head on synthetic passkey documents; this is the measurement that gate approximates, with no
training: a head's score for a document is the mean, over its decode steps, of the attention mass on the keys a
streaming head would drop (neither sink nor recent). High means retrieval head (it needs the full cache), near 0 means
streaming head.

Defaults are DuoAttention's own: `--sink_size 64`, `--recent_size 256` (`duo_attn/utils.py` lines 38-39, and the
deployment example of its README, lines 145-146). Every document counts, right answer or not: DuoAttention's gates
are trained on every synthetic sample, with no correctness check.
"""

from __future__ import annotations

import torch

SINK_TOKENS = 64
RECENT_TOKENS = 256
GATE_TEXT = "every document (DuoAttention trains its gates on every sample, with no answer check)"


class DistantScoreTracker:
    """Mean attention mass of every (layer, head) outside the sinks and the recent window, over decode steps."""

    def __init__(self, sink_tokens: int, recent_tokens: int, num_layers: int, num_heads: int) -> None:
        self.sink_tokens = sink_tokens
        self.recent_tokens = recent_tokens
        self.steps = 0
        self.total = torch.zeros(num_layers, num_heads, dtype=torch.float64)

    def update(self, rows: torch.Tensor, first_position: int) -> None:
        """One decode step: `rows` (layers, heads, K) are the softmax rows of the current query, key column j at
        absolute position `first_position + j` (the last column is the query's own key)."""
        self.steps += 1
        width = rows.shape[-1]
        first = max(self.sink_tokens - first_position, 0)  # the first column past the sinks
        last = width - self.recent_tokens  # columns from here on are the recent window
        if last > first:
            self.total += rows[..., first:last].sum(dim=-1).double().to(self.total.device)

    def scores(self) -> torch.Tensor:
        """(layers, heads): the document's mean distant mass per decode step, in [0, 1]."""
        return self.total / max(self.steps, 1)
