"""Retrieval-head detection on the bundled SmolLM2: real NIAH documents, real retrieval heads."""

from __future__ import annotations

import torch

from lm_eval_retrieval.haystack import build_document, get_needles
from lm_eval_retrieval.models.head_trace import answer_token_span
from reference_retrieval import reference_retrieval_scores


def _doc(lm, sentences, length=600, depth=50.0, needle_index=0):
    return build_document(lm.tokenizer, sentences, get_needles("en")[needle_index], length, depth)


def test_probe_equals_eager_reference_on_a_real_niah_document(smollm2_lm, english_sentences) -> None:
    lm = smollm2_lm
    doc = _doc(lm, english_sentences)
    encoded = lm.tokenizer(doc["input"], return_offsets_mapping=True, add_special_tokens=False)
    span = answer_token_span(encoded["offset_mapping"], doc["answer_char_start"], doc["answer_char_end"])
    counted_before = lm.documents_counted
    response = lm.trace_document(doc["input"], doc, {"until": ["\n"], "max_gen_toks": 50})
    assert lm.documents_counted == counted_before + 1, f"SmolLM2 should find the needle at 600 tokens: {response!r}"
    got = torch.tensor([lm.head_scores[f"{layer}-{head}"][-1] for layer in range(30) for head in range(9)], dtype=torch.float64)

    steps = len(lm.tokenizer(response, add_special_tokens=False)["input_ids"]) + 1
    implementation = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")  # the plain model path, which bypasses the plugin's hook entirely
    try:
        expected, tokens = reference_retrieval_scores(lm.model, encoded["input_ids"], span, steps)
    finally:
        lm.model.set_attn_implementation(implementation)
    assert lm.tokenizer.decode(tokens, skip_special_tokens=True).strip().startswith(response)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64).flatten(), atol=1e-12, rtol=0)
    assert got.max() > 0.5, "a real NIAH answer is copied by at least one strong retrieval head"


def test_a_wrong_answer_adds_nothing(smollm2_lm, english_sentences) -> None:
    lm = smollm2_lm
    doc = _doc(lm, english_sentences, needle_index=1)
    # Grade the response against an answer the model cannot give: ROUGE-1 recall is 0, so the run must not count.
    wrong = dict(doc, answer="zebra xylophone quartz")
    before = {key: list(values) for key, values in lm.head_scores.items()}
    counted, ran = lm.documents_counted, lm.documents_run
    lm.trace_document(wrong["input"], wrong, {"until": ["\n"]})
    assert lm.documents_run == ran + 1
    assert lm.documents_counted == counted
    assert lm.head_scores == before
