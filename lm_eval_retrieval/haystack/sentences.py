"""Sentence splitting: the haystack is cut only at sentence ends, so the needle never lands mid-sentence.

Splitting is per language because sentence ends differ: English `.!?` before a space and a capital; German the
same, with German capitals and quotes, and with abbreviations ("z. B.", "Nr.", "Abs.") and ordinals ("8. Juni")
that do not end a sentence; Chinese `。！？` with no space after, never inside a quotation, so that a needle is
not put between the halves of a speech. Paragraph breaks always end a sentence, and fragments that do not end with
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


# --- German ----------------------------------------------------------------------------------------------------

_DE_ABBREVIATIONS = frozenset(
    {
        "nr", "art", "abs", "bzw", "vgl", "ggf", "gem", "bspw", "ca", "evtl", "inkl", "zzgl", "bzgl", "sog", "dr",
        "prof", "st", "hl", "mio", "mrd", "ziff", "buchst", "unterabs", "anh", "kap", "s", "abl", "lit", "bd",
        "jh", "jhd", "str", "tel", "z.b", "d.h", "u.a", "o.ä", "u.ä", "v.a", "z.t", "i.d.r", "a.a.o", "u.u", "o.g",
        "dgl", "hrsg", "verf", "nachf", "gegr", "geb", "gest", "einschl", "allg", "insb", "ebd", "zit",
    }
)
_DE_UPPER = "A-ZÄÖÜ"
# Closing quotes in German include “ (after „) and the guillemets » « in either direction.
_DE_BOUNDARY = re.compile(
    r"[.!?][\"'\u2018\u2019\u201c\u201d\u00ab\u00bb)\]]*"
    rf"(?=\s+[\"'\u201e\u201a\u00bb\u00ab\u2018\u201c(\[]?[{_DE_UPPER}])"
)
_DE_END = re.compile(r"[.!?][\"'\u2018\u2019\u201c\u201d\u00ab\u00bb)\]]*$")


def _split_de(paragraph: str) -> list[str]:
    """German: like English, but ordinals ("am 8. Juni") and German abbreviations ("z. B.", "Abs.") stay inside."""
    pieces: list[str] = []
    start = 0
    for match in _DE_BOUNDARY.finditer(paragraph):
        end = match.end()
        if paragraph[match.start()] == "." and _is_de_abbreviation(paragraph, match.start()):
            continue
        pieces.append(paragraph[start:end].strip())
        start = end
    pieces.append(paragraph[start:].strip())
    return [piece for piece in pieces if piece and _DE_END.search(piece)]


def _is_de_abbreviation(paragraph: str, dot: int) -> bool:
    """True for German abbreviations, single letters ("z. B.", "d. h.", initials) and ordinal numbers ("8.")."""
    word_start = paragraph.rfind(" ", 0, dot) + 1
    word = paragraph[word_start:dot].lstrip("(\"'\u201e\u201c\u00bb\u00ab\u2018")
    return word.lower() in _DE_ABBREVIATIONS or len(word) == 1 and word.isalpha() or word.isdigit()


# --- Chinese ---------------------------------------------------------------------------------------------------

_ZH_TERMINALS = "。！？"
_ZH_OPEN = "“‘「『（《"
_ZH_CLOSE = "”’」』）》"
_ZH_END_QUOTES = "”’」』"
_ZH_END = re.compile(rf"[{_ZH_TERMINALS}][{_ZH_END_QUOTES}]*$")


def _split_zh(paragraph: str) -> list[str]:
    """Chinese: cut after 。！？ (with the closing quotes that follow), but only outside quotations and brackets.

    A speech such as 曰：“……也。……乎？” stays one sentence; a paragraph with an unbalanced quote is one sentence
    from that quote on (a paragraph break always ends a sentence).
    """
    pieces: list[str] = []
    start = depth = 0
    i, size = 0, len(paragraph)
    while i < size:
        ch = paragraph[i]
        if ch in _ZH_OPEN:
            depth += 1
        elif ch in _ZH_CLOSE:
            depth = max(0, depth - 1)
        elif ch in _ZH_TERMINALS:
            j = i + 1
            while j < size and paragraph[j] in _ZH_TERMINALS:  # ！？ and 。。 runs end together
                j += 1
            closing = depth
            while j < size and closing > 0 and paragraph[j] in _ZH_END_QUOTES:
                closing -= 1
                j += 1
            if closing == 0:
                pieces.append(paragraph[start:j].strip())
                start, depth = j, 0
            i = j
            continue
        i += 1
    pieces.append(paragraph[start:].strip())
    return [piece for piece in pieces if piece and _ZH_END.search(piece)]


_SPLITTERS: dict[str, Callable[[str], list[str]]] = {"en": _split_en, "de": _split_de, "zh": _split_zh}
