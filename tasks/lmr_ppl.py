"""`custom_dataset` of `retrieval_ppl_en`: the English haystack prose cut into documents of whole sentences."""

from __future__ import annotations

import re
from typing import Any

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.haystack import load_haystack_text, split_sentences
from lm_eval_retrieval.haystack.grid import check_metadata_keys, metadata_from_argv

PPL_KEYS = {
    "doc_sentences": "sentences per document (default 40, about 1k tokens)",
    "haystack": "'auto' (real prose) or 'noise'",
    "haystack_path": "a .txt or .jsonl (field 'text') file of your own",
}


def retrieval_ppl_en(**metadata: Any) -> dict:
    import datasets

    argv_metadata = metadata_from_argv()
    if argv_metadata is not None:
        check_metadata_keys(set(argv_metadata), PPL_KEYS)
    size = int(metadata.get("doc_sentences", 40))
    if size <= 0:
        raise UserInputError(f"doc_sentences must be a positive number of sentences, got {size}")
    source = "noise" if metadata.get("haystack") == "noise" else "auto"
    sentences = split_sentences(load_haystack_text("en", source=source, path=metadata.get("haystack_path")), "en")
    documents = [{"text": " ".join(sentences[i : i + size])} for i in range(0, len(sentences), size)]
    return {"test": datasets.Dataset.from_list(documents, split=datasets.Split.TEST)}


def process_results(doc: dict, results: list[float]) -> dict[str, tuple[float, int]]:
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"].strip()))
    size = len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, size),
        "bits_per_byte": (loglikelihood, size),
    }
