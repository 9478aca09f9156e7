"""Sentence splitting: the haystack is cut only at sentence ends, so the needle never lands mid-sentence.

Splitting is per language because sentence ends differ (English `.!?` before a space and a capital; Chinese
`。！？` with no space after, to come). Paragraph breaks always end a sentence, and fragments that do not end with
sentence punctuation (headings, captions, list stubs) are dropped: the document builder wants whole sentences.
"""

from __future__ import annotations

import re
from typing import Callable

from lm_eval_retrieval.errors import UserInputError

# Words whose trailing period is not a sentence end (lower case, without the final period).
_EN_ABBREVIATIONS = frozenset(
    {"e.g", "i.e", "cf", "vs", "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "fig", "al", "approx"}
)
# A candidate end: terminal punctuation, optional closing quotes/brackets, whitespace, then a capital or an
# opening quote/bracket.
_EN_BOUNDARY = re.compile(r"[.!?][\"'\u2019\u201d)\]]*(?=\s+[\"'\u2018\u201c(\[]?[A-Z])")
_EN_END = re.compile(r"[.!?][\"'\u2019\u201d)\]]*$")
_PARAGRAPHS = re.compile(r"\n[ \t]*\n")


def split_sentences(text: str, language: str = "en") -> list[str]:
    """Whole sentences of `text`, each stripped and ending with its punctuation; hard-wrapped lines are joined."""
    try:
        splitter = _SPLITTERS[language]
    except (KeyError, TypeError):
        raise UserInputError(
            f"no sentence splitter for language {language!r}; use one of: {', '.join(sorted(_SPLITTERS))}"
        ) from None
    if not isinstance(text, str):
        raise UserInputError(f"split_sentences needs text (a str); got {type(text).__name__}")
    sentences: list[str] = []
    for paragraph in _PARAGRAPHS.split(text.replace("\r\n", "\n").replace("\r", "\n")):
        flat = " ".join(paragraph.split())
        if flat:
            sentences.extend(splitter(flat))
    return sentences


def _split_en(paragraph: str) -> list[str]:
    """English: cut after `.!?` (+ closing quotes) when a capital or opening quote follows, except abbreviations."""
    pieces: list[str] = []
    start = 0
    for match in _EN_BOUNDARY.finditer(paragraph):
        end = match.end()
        if paragraph[match.start()] == "." and _is_abbreviation(paragraph, match.start()):
            continue
        pieces.append(paragraph[start:end].strip())
        start = end
    pieces.append(paragraph[start:].strip())
    return [piece for piece in pieces if piece and _EN_END.search(piece)]


def _is_abbreviation(paragraph: str, dot: int) -> bool:
    """True when the period at `dot` closes an abbreviation ("e.g.", "Mr.") or an initial ("J. Smith")."""
    word_start = paragraph.rfind(" ", 0, dot) + 1
    word = paragraph[word_start:dot].lstrip("(\"'\u201c\u2018")
    return word.lower() in _EN_ABBREVIATIONS or (len(word) == 1 and word.isupper())


_SPLITTERS: dict[str, Callable[[str], list[str]]] = {"en": _split_en}
