"""QRHead's query-focused retrieval score (`scores=qr`) of one NIAH document, from the prefill's question rows.

Wu et al. 2025, "Query-Focused Retrieval Heads Improve Long-Context Reasoning and Re-ranking" (arXiv 2506.09944).
The rule is the authors' code, github.com/princeton-pli/QRHead at commit 7a668e7, `src/qrretriever/attn_retriever.py`:

- `score_per_token_attention_to_query` (lines 323-353): each head's causal softmax attention of every query-span
  token over the prompt, averaged over those tokens (line 349), gives one weight per key;
- `score_docs_per_head_for_detection` (lines 258-320): the same with the question replaced by the null query "N/A"
  (line 32, `null_query`), run from the cache of the text before the question (lines 283-289); the calibrated weight
  is the difference (line 292); over the gold document's tokens, weights below mean - 2 std of that document are
  dropped (lines 304-310, torch's unbiased std) and the rest summed (line 311): the document's score per head;
- `exp_scripts/detection/detect_qrhead_lme.py` (lines 9-32): a head's QRScore is that sum over the gold documents,
  averaged over the questions. No answer is generated or graded there, so every document counts.

Here the gold document is the needle sentence (the answer span where a document does not name its needle), and the
query span is the question through the end of the prompt (the answer cue and any chat-template suffix), as QRHead's
span runs from its query to the end of its prompt suffix (lines 177-178). The logits use the model's own attention
scaling (QRHead's line 364 assumes 1/sqrt(head_dim), which is the same for most models).
"""

from __future__ import annotations

import torch

NULL_QUERY = "N/A"
GATE_TEXT = "every document (QRHead scores gold documents with no answer check)"


def qr_scores(question: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """(layers, heads) QR scores of one document from the mean attention (layers, heads, needle tokens) that the
    question's rows and the null query's rows give each needle token."""
    calibrated = question.double() - null.double()
    if calibrated.shape[-1] < 2:  # QRHead's std of one token is NaN, so nothing passes its threshold
        return torch.zeros(calibrated.shape[:-1], dtype=torch.float64)
    threshold = calibrated.mean(dim=-1, keepdim=True) - 2 * calibrated.std(dim=-1, keepdim=True)
    return torch.where(calibrated > threshold, calibrated, 0.0).sum(dim=-1)
