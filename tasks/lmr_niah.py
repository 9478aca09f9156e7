"""`custom_dataset` and `process_results` of the bundled NIAH tasks (imported by lm-eval through `!function`).

Each task fixes a language triple (needle+question language, haystack language, answer language); the English task
takes all three from `--metadata` instead, so any combination runs through it:
`--tasks niah_retrieval_heads_en --metadata '{"language":"en","haystack_language":"zh","answer_language":"de"}'`.
"""

from __future__ import annotations

import itertools
import logging
import random
import warnings
from typing import Any

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.haystack import build_document, get_needles, load_haystack_text, split_sentences
from lm_eval_retrieval.haystack.grid import cap_lengths, load_tokenizer_and_max_length, metadata_from_argv, parse_grid
from lm_eval_retrieval.haystack.languages import LANGUAGES, check_language
from lm_eval_retrieval.metrics.rouge import needle_found, rouge1_recall

log = logging.getLogger(__name__)

LANGUAGE_KEYS = ("language", "haystack_language", "answer_language")


def check_language_triple(language: Any, haystack_language: Any, answer_language: Any) -> tuple[str, str, str]:
    """The triple as known codes, or a one-line error naming the supported languages and answer languages."""
    language = check_language(language, "language")
    haystack_language = check_language(haystack_language, "haystack_language")
    answer_language = check_language(answer_language, "answer_language")
    needles = get_needles(language)
    supported = [code for code in LANGUAGES if all(code == n.language or code in n.translations for n in needles)]
    if answer_language not in supported:
        raise UserInputError(
            f"answer_language {answer_language!r} is not supported for {language!r} needles (no gold answers); "
            f"supported answer languages: {', '.join(supported)}"
        )
    return language, haystack_language, answer_language


def _niah_documents(metadata: dict[str, Any]) -> list[dict[str, Any]]:
    spec = parse_grid(metadata, metadata_from_argv())
    language, haystack_language, answer_language = check_language_triple(
        spec.language, spec.haystack_language, spec.answer_language
    )
    pretrained = metadata.get("tokenizer") or metadata.get("pretrained")
    if not pretrained:
        raise UserInputError("the NIAH tasks size documents in model tokens: pass --model_args pretrained=<model>")
    tokenizer, model_max, name = load_tokenizer_and_max_length(str(pretrained), metadata.get("gguf_file"))
    if metadata.get("max_length"):
        model_max = int(metadata["max_length"])
    lengths = cap_lengths(spec, model_max, name)
    needles = get_needles(language)
    source = "noise" if spec.haystack == "noise" else "auto"
    text = load_haystack_text(haystack_language, source=source, path=spec.haystack_path)
    sentences = split_sentences(text, haystack_language)
    order = list(range(len(needles)))
    random.Random(spec.seed).shuffle(order)
    rotation = itertools.cycle(order)
    documents = []
    for length in lengths:
        for depth in spec.depths:
            for _ in range(spec.needles_per_cell):
                needle = needles[next(rotation)]
                documents.append(
                    build_document(
                        tokenizer, sentences, needle, length, depth, chat_template=spec.chat_template,
                        haystack_language=haystack_language, answer_language=answer_language,
                    )
                )
    return documents


def _dataset(metadata: dict[str, Any]) -> dict:
    import datasets

    documents = _niah_documents(metadata)
    return {"test": datasets.Dataset.from_list(documents, split=datasets.Split.TEST)}


def _fixed_task(task: str, metadata: dict[str, Any], language: str, haystack_language: str, answer_language: str):
    """A task whose language triple is its definition: `--metadata` language keys do not change it (a warning)."""
    triple = {"language": language, "haystack_language": haystack_language, "answer_language": answer_language}
    asked = {key: metadata[key] for key in LANGUAGE_KEYS if metadata.get(key) not in (None, "", triple[key])}
    if asked:
        message = (
            f"{task} always runs {triple}; ignoring --metadata {asked}. "
            "For other combinations use niah_retrieval_heads_en with language, haystack_language and answer_language"
        )
        warnings.warn(message)
        log.warning(message)
    return _dataset({**metadata, **triple})


def niah_retrieval_heads_en(**metadata: Any) -> dict:
    """English by default; `language`, `haystack_language` and `answer_language` from `--metadata` pass through."""
    return _dataset({**metadata, "language": metadata.get("language") or "en"})


def niah_retrieval_heads_zh(**metadata: Any) -> dict:
    return _fixed_task("niah_retrieval_heads_zh", metadata, "zh", "zh", "zh")


def niah_retrieval_heads_de(**metadata: Any) -> dict:
    return _fixed_task("niah_retrieval_heads_de", metadata, "de", "de", "de")


def niah_retrieval_heads_en_in_zh(**metadata: Any) -> dict:
    """English needle and question in a Chinese haystack; the model copies the English answer."""
    return _fixed_task("niah_retrieval_heads_en_in_zh", metadata, "en", "zh", "en")


def niah_retrieval_heads_en_in_de(**metadata: Any) -> dict:
    """English needle and question in a German haystack; the model copies the English answer."""
    return _fixed_task("niah_retrieval_heads_en_in_de", metadata, "en", "de", "en")


def niah_translation_heads_en_zh(**metadata: Any) -> dict:
    """English needle, question and haystack; the model is told to answer in Chinese."""
    return _fixed_task("niah_translation_heads_en_zh", metadata, "en", "en", "zh")


def niah_translation_heads_en_de(**metadata: Any) -> dict:
    """English needle, question and haystack; the model is told to answer in German."""
    return _fixed_task("niah_translation_heads_en_de", metadata, "en", "en", "de")


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    response = results[0]
    language = doc.get("answer_language", doc.get("language", "en"))
    return {
        "rouge1_recall": rouge1_recall(response, doc["answer"], language),
        "needle_found": needle_found(response, doc["answer"]),
    }
