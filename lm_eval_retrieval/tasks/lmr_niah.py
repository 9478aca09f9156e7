"""`custom_dataset` and `process_results` of the bundled NIAH tasks (imported by lm-eval through `!function`)."""

from __future__ import annotations

import itertools
import random
from typing import Any

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.haystack import build_document, get_needles, load_haystack_text, split_sentences
from lm_eval_retrieval.haystack.grid import cap_lengths, load_tokenizer_and_max_length, metadata_from_argv, parse_grid
from lm_eval_retrieval.metrics.rouge import needle_found, rouge1_recall


def _niah_documents(metadata: dict[str, Any]) -> list[dict[str, Any]]:
    spec = parse_grid(metadata, metadata_from_argv())
    pretrained = metadata.get("tokenizer") or metadata.get("pretrained")
    if not pretrained:
        raise UserInputError("the NIAH tasks size documents in model tokens: pass --model_args pretrained=<model>")
    tokenizer, model_max, name = load_tokenizer_and_max_length(str(pretrained), metadata.get("gguf_file"))
    if metadata.get("max_length"):
        model_max = int(metadata["max_length"])
    lengths = cap_lengths(spec, model_max, name)
    needles = get_needles(spec.language)
    source = "noise" if spec.haystack == "noise" else "auto"
    text = load_haystack_text(spec.haystack_language, source=source, path=spec.haystack_path)
    sentences = split_sentences(text, spec.haystack_language)
    order = list(range(len(needles)))
    random.Random(spec.seed).shuffle(order)
    rotation = itertools.cycle(order)
    documents = []
    for length in lengths:
        for depth in spec.depths:
            for _ in range(spec.needles_per_cell):
                needle = needles[next(rotation)]
                documents.append(
                    build_document(tokenizer, sentences, needle, length, depth, chat_template=spec.chat_template)
                )
    return documents


def niah_retrieval_heads_en(**metadata: Any) -> dict:
    import datasets

    documents = _niah_documents({**metadata, "language": metadata.get("language", "en")})
    return {"test": datasets.Dataset.from_list(documents, split=datasets.Split.TEST)}


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    response = results[0]
    language = doc.get("answer_language", doc.get("language", "en"))
    return {
        "rouge1_recall": rouge1_recall(response, doc["answer"], language),
        "needle_found": needle_found(response, doc["answer"]),
    }
