"""HeadKV's retrieval-reasoning score (`scores=mass`), accumulated over the decode steps of one NIAH document.

Fu et al. 2024, "Not All Heads Matter: A Head-Level KV Cache Compression Method with Integrated Retrieval and
Reasoning" (arXiv 2410.19258). The rule is the authors' detection script, github.com/FYYFU/HeadKV at commit 0862a09,
`Important_Head/retrieval_head_detection_r2.py`:

- `retrieval_calculate` (lines 217-236): at each decode step, for every head, take the k keys with the most attention
  for the current query, k = the needle span's length in tokens; each of them that lies inside the span adds its
  attention weight / k. The copy score's token check is commented out there (line 224): the generated token need not
  be the attended one, so a head that reads the needle while the model paraphrases or reasons still gets credit.
- `decode` (lines 243-257): the answer is decoded for at most |answer tokens| steps (line 255), and the document's
  score is the sum over those steps (line 228 adds, nothing divides by the step count);
- `evaluate_and_log` (lines 314-317): the document counts when LongBench's QA-F1 of that response against the answer
  is above 50 (`metrics.py`, `qa_f1_score`, lines 8-24 and 65-81); a head's score is the mean over counted documents.

HeadKV's span and graded answer are the same text, its `real_needle`: the sentence the model is expected to say back
(`haystack_for_detect_r2/needles.jsonl`). Here that is the needle sentence (`doc["needle"]`), which is what models
answer with (SmolLM2 restates it whole); the detection falls back to the answer span and `answer` for documents that
do not name their needle. In a cross-lingual document the graded text and the step count follow the gold answer in the
answer language, since the needle sentence is not what the model is asked to say.
"""

from __future__ import annotations

import re
import string
from collections import Counter

import torch

GATE = 50.0
GATE_TEXT = "QA-F1 > 50 of the first |needle| generated tokens against the needle sentence (HeadKV)"


class MassScoreTracker:
    """HeadKV's per-step credit of every (layer, head) for one document, over its first `steps` decode steps."""

    def __init__(self, span: tuple[int, int], steps: int, num_layers: int, num_heads: int) -> None:
        start, end = span
        if not 0 <= start < end:
            raise ValueError(f"needle span {span} is empty")
        self.start, self.end = start, end
        self.steps = steps
        self.seen = 0
        self.total = torch.zeros(num_layers, num_heads, dtype=torch.float64)

    def update(self, rows: torch.Tensor, first_position: int) -> None:
        """One decode step: `rows` (layers, heads, K) are the softmax rows of the current query, key column j at
        absolute position `first_position + j`."""
        self.seen += 1
        if self.seen > self.steps:
            return
        width = self.end - self.start
        values, ids = rows.topk(min(width, rows.shape[-1]), dim=-1)
        positions = ids + first_position
        inside = (positions >= self.start) & (positions < self.end)
        credit = torch.where(inside, values, 0.0).sum(dim=-1).double() / width
        self.total += credit.to(self.total.device)

    def scores(self) -> torch.Tensor:
        """(layers, heads): the document's summed credit."""
        return self.total.clone()


def _normalize_answer(text: str) -> str:
    """LongBench's (and HeadKV's) normalisation: lower case, no punctuation, no English articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def qa_f1(prediction: str, reference: str, language: str = "en") -> float:
    """LongBench's QA-F1 x 100 of `prediction` against `reference`: word overlap after normalisation (Chinese:
    jieba words with punctuation dropped, as LongBench's `qa_f1_zh_score`)."""
    if language == "zh":
        from .rouge import chinese_tokens

        predicted, gold = chinese_tokens(prediction), chinese_tokens(reference)
    else:
        predicted, gold = _normalize_answer(prediction).split(), _normalize_answer(reference).split()
    same = sum((Counter(predicted) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(gold)
    return 100.0 * 2 * precision * recall / (precision + recall)
