"""The task's grid and its bad-input errors, called the way lm-eval calls `custom_dataset`."""

from __future__ import annotations

import sys

import pytest

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.haystack.grid import DEFAULT_CONTEXT_LENGTHS, DEFAULT_DEPTHS

from bundled_tasks import task_module

niah_retrieval_heads_en = task_module("lmr_niah").niah_retrieval_heads_en  # tasks/lmr_niah.py


def _dataset(monkeypatch, argv_metadata: str | None, **metadata):
    argv = ["lm_eval", "--model", "retrieval-head-hf"] + (["--metadata", argv_metadata] if argv_metadata else [])
    monkeypatch.setattr(sys, "argv", argv)
    return niah_retrieval_heads_en(pretrained="smollm2-135m", version=1.0, **metadata)["test"]


def test_grid_is_lengths_by_depths(monkeypatch) -> None:
    docs = _dataset(monkeypatch, None, context_lengths=[400, 800], depths=[0, 50, 100])
    assert len(docs) == 6
    assert sorted({(d["context_length"], d["depth"]) for d in docs}) == [
        (400, 0.0), (400, 50.0), (400, 100.0), (800, 0.0), (800, 50.0), (800, 100.0)
    ]
    assert len({d["answer"] for d in docs}) == 6, "needles rotate through the grid"
    for doc in docs:
        assert doc["input"][doc["answer_char_start"] : doc["answer_char_end"]] == doc["answer"]


def test_defaults_are_the_original_grid_capped_at_the_model(monkeypatch) -> None:
    assert DEFAULT_CONTEXT_LENGTHS[0] == 1000 and DEFAULT_CONTEXT_LENGTHS[-1] == 50000 and len(DEFAULT_CONTEXT_LENGTHS) == 20
    assert DEFAULT_DEPTHS[0] == 0 and DEFAULT_DEPTHS[-1] == 100 and len(DEFAULT_DEPTHS) == 10
    with pytest.warns(UserWarning, match="capped at 8128"):
        docs = _dataset(monkeypatch, None, depths=[50])
    assert max(d["context_length"] for d in docs) == 8128
    assert [d["context_length"] for d in docs] == [1000, 3579, 6158, 8128]


def test_unknown_metadata_key_names_the_known_ones(monkeypatch) -> None:
    with pytest.raises(UserInputError, match="unknown --metadata key.*'context_length'.*known keys: context_lengths"):
        _dataset(monkeypatch, '{"context_length":[500]}', context_length=[500])


def test_context_beyond_the_model_is_an_error(monkeypatch) -> None:
    with pytest.raises(UserInputError, match=r"exceed what smollm2-135m can take \(8192 tokens"):
        _dataset(monkeypatch, '{"context_lengths":[9000]}', context_lengths=[9000])


def test_task_without_needle_span_is_an_error(smollm2_lm) -> None:
    with pytest.raises(UserInputError, match="no needle span"):
        smollm2_lm.trace_document("What is 2+2?", {"question": "What is 2+2?"}, {})
