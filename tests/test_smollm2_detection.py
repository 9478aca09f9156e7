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


def test_translation_heads_equal_eager_reference(smollm2_lm, english_sentences) -> None:
    """The translation tracker on a real English-in-English document told to answer in German, against the eager
    reference. The gold answer is swapped for the English needle answer so that the greedy response (which SmolLM2
    gives in English) produces gold tokens while heads attend into the span: a test whose scores can be non-zero."""
    from lm_eval_retrieval.metrics.retrieval_score import TranslationScoreTracker
    from reference_retrieval import reference_translation_scores

    lm = smollm2_lm
    doc = build_document(lm.tokenizer, english_sentences, get_needles("en")[0], 600, 50.0, answer_language="de")
    assert doc["answer_language"] == "de" and doc["answer"] != doc["needle_answer"]
    doc = dict(doc, answer=" " + doc["needle_answer"])  # the leading space: the token the model emits after "Answer:"
    encoded = lm.tokenizer(doc["input"], return_offsets_mapping=True, add_special_tokens=False)
    prompt_ids = torch.tensor(encoded["input_ids"])
    span = answer_token_span(encoded["offset_mapping"], doc["answer_char_start"], doc["answer_char_end"])
    tracker = lm._tracker(prompt_ids, span, doc)
    assert isinstance(tracker, TranslationScoreTracker)
    steps = 40  # SmolLM2 restates the question before the answer
    generated = lm._decode_with_probe(prompt_ids, tracker, steps, [])
    got = tracker.scores().flatten()

    implementation = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")
    try:
        gold = lm.tokenizer(doc["answer"], add_special_tokens=False)["input_ids"]
        expected, tokens = reference_translation_scores(lm.model, encoded["input_ids"], span, gold, len(generated))
    finally:
        lm.model.set_attn_implementation(implementation)
    assert tokens == generated
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64).flatten(), atol=1e-12, rtol=0)
    assert got.max() > 0.5, f"SmolLM2 copies the needle answer here: {lm.tokenizer.decode(generated)!r}"


def _request(doc, idx=0, doc_id=0):
    from lm_eval.api.instance import Instance

    return Instance(request_type="generate_until", doc=doc, arguments=(doc["input"], {"until": ["\n"]}), idx=idx,
                    metadata=("niah_retrieval_heads_en", doc_id, 1))


def test_a_repeated_request_is_traced_once(smollm2_lm, english_sentences) -> None:
    """lm-eval pads the shorter ranks of a multi-process run by repeating a request: it must count once."""
    lm = smollm2_lm
    lm.reset_scores()
    request = _request(_doc(lm, english_sentences, length=300))
    calls = []
    trace = lm._trace
    lm._trace = lambda *args: calls.append(1) or trace(*args)
    try:
        responses = lm.generate_until([request, request], disable_tqdm=True)
    finally:
        del lm._trace
    assert len(calls) == 1 and responses[0] == responses[1]
    assert lm.documents_run == 1 and all(len(v) == lm.documents_counted for v in lm.head_scores.values())


def test_a_document_longer_than_the_model_is_skipped_with_a_warning(smollm2_lm, english_sentences, caplog) -> None:
    lm = smollm2_lm
    lm.reset_scores()
    doc = _doc(lm, english_sentences, length=600)
    max_length = lm._max_length
    lm._max_length = 400
    try:
        with caplog.at_level("WARNING"):
            responses = lm.generate_until([_request(doc)], disable_tqdm=True)
    finally:
        lm._max_length = max_length
    assert responses == [""]
    assert lm.documents_skipped == 1 and lm.documents_run == 0
    assert any("skipped a document of" in r.getMessage() and "max length 400" in r.getMessage() for r in caplog.records)
