"""The approximation probe on SmolLM2 (GQA 9/3, real text) against the fp64 reference, padding and decode included."""

from __future__ import annotations

import torch

from lm_eval_retrieval.attention.approx import exact_topk, simhash
from test_approx_probe import analysed_run, assert_matches_reference


def _real_batch(tokenizer):
    texts = [
        "The keeper climbed the stairs of the lighthouse every evening to light the great lamp.",
        "Rain fell on the harbour while the boats rocked gently against the old stone wall, and nobody went out.",
    ]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    length = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])  # left padding
    padding = torch.tensor([[0] * (length - len(r)) + [1] * (len(r) + 1) for r in rows])
    return ids, padding


def test_exact_topk_on_smollm2_matches_reference(smollm2_lm) -> None:
    model = smollm2_lm.model
    ids, padding = _real_batch(smollm2_lm.tokenizer)
    probe, capture, _ = analysed_run(model, exact_topk, ids, padding)
    assert_matches_reference(probe, capture, model, padding, [ids.shape[1], ids.shape[1] + 1])


def test_simhash_on_smollm2_matches_reference(smollm2_lm) -> None:
    model = smollm2_lm.model
    ids, padding = _real_batch(smollm2_lm.tokenizer)
    probe, capture, _ = analysed_run(model, simhash, ids, padding)
    assert_matches_reference(probe, capture, model, padding, [ids.shape[1], ids.shape[1] + 1], approx_fn=simhash)
    assert float(probe.stats.means("recall").nanmean()) < 0.95
