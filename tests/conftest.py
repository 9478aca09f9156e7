"""Shared fixtures: one SmolLM2 load for the whole session (it takes ~20 s on 2 cores)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_lm(tmp_path_factory):
    from lm_eval_retrieval.models.head_trace import RetrievalHeadLM

    return RetrievalHeadLM(pretrained="smollm2-135m", output_path=str(tmp_path_factory.mktemp("smollm2")))


@pytest.fixture(scope="session")
def english_sentences():
    from lm_eval_retrieval.haystack import load_haystack_text, split_sentences

    return split_sentences(load_haystack_text("en"), "en")
