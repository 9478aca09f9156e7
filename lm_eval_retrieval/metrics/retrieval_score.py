"""The retrieval score of Wu et al. (2024), accumulated over the decode steps of one NIAH document.

A head copies at a step when its top-1 key lies inside the needle-answer span and the prompt token there is the token
being generated. The paper defines the score as |g_h ∩ k| / |k| (the set of needle tokens the head copied, over the
needle length), so a span position copied twice counts once and scores stay in [0, 1]; the original script added
1/|k| per step instead, which exceeds 1 when a model repeats its answer.
"""

from __future__ import annotations

import torch


class RetrievalScoreTracker:
    """Hits of every (layer, head) on every answer-span position for one document."""

    def __init__(self, prompt_ids: torch.Tensor, span: tuple[int, int], num_layers: int, num_heads: int) -> None:
        start, end = span
        if not 0 <= start < end <= prompt_ids.numel():
            raise ValueError(f"answer span {span} is not inside a prompt of {prompt_ids.numel()} tokens")
        self.prompt_ids = prompt_ids
        self.start, self.end = start, end
        self.hits = torch.zeros(num_layers, num_heads, end - start, dtype=torch.bool, device=prompt_ids.device)

    def update(self, top1_positions: torch.Tensor, generated_token: int | torch.Tensor) -> None:
        """Record one decode step: `top1_positions` (layers, heads) are absolute key positions."""
        in_span = (top1_positions >= self.start) & (top1_positions < self.end)
        prompt_token = self.prompt_ids[top1_positions.clamp(0, self.prompt_ids.numel() - 1)]
        hit = in_span & (prompt_token == generated_token)
        if hit.any():
            layer, head = hit.nonzero(as_tuple=True)
            self.hits[layer, head, top1_positions[layer, head] - self.start] = True

    def scores(self) -> torch.Tensor:
        """(layers, heads) retrieval scores of this document, in [0, 1]."""
        return self.hits.sum(dim=-1).double() / (self.end - self.start)


class TranslationScoreTracker(RetrievalScoreTracker):
    """"Translation heads": the needle is in one language and the model answers in another.

    A step is a hit for a head when its top-1 key lies in the needle-answer span of the prompt while the generated
    token belongs to the gold answer in the answer language; each gold-answer token counts once, so the score is
    |gold tokens produced while attending into the span| / |gold tokens|.
    """

    def __init__(
        self, prompt_ids: torch.Tensor, span: tuple[int, int], gold_ids: list[int], num_layers: int, num_heads: int
    ) -> None:
        super().__init__(prompt_ids, span, num_layers, num_heads)
        if not gold_ids:
            raise ValueError("the gold answer has no tokens")
        self.gold_ids = torch.tensor(gold_ids, device=prompt_ids.device)
        self.hits = torch.zeros(num_layers, num_heads, len(gold_ids), dtype=torch.bool, device=prompt_ids.device)

    def update(self, top1_positions: torch.Tensor, generated_token: int | torch.Tensor) -> None:
        in_span = (top1_positions >= self.start) & (top1_positions < self.end)
        candidates = (self.gold_ids == generated_token).nonzero(as_tuple=True)[0]
        if not in_span.any() or candidates.numel() == 0:
            return
        for position in candidates.tolist():  # the first gold position of this token not yet credited, per head
            fresh = in_span & ~self.hits[..., position]
            self.hits[..., position] |= fresh
            in_span = in_span & ~fresh

    def scores(self) -> torch.Tensor:
        return self.hits.sum(dim=-1).double() / self.hits.shape[-1]
