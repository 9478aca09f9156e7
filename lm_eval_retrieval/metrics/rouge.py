"""Answer checks for needle-in-a-haystack runs: the ROUGE-1 recall gate and a plain "needle found" check.

The retrieval-head definition only counts a run's head scores when the model actually retrieved the needle, judged
as ROUGE-1 recall of the response against the needle answer above 50 (Wu et al. 2024). To keep head scores
comparable with the original tool's files, English uses exactly its scorer: ``rouge_score``'s ``RougeScorer`` with
the Porter stemmer on, called as ``scorer.score(reference, prediction)['rouge1'].recall * 100``.

Languages differ in tokenisation (rouge-score's default tokenizer drops every non-ASCII letter, so a Chinese
answer would silently score 0 and "Müller" would become "m ller"), so each language has its own scorer in
``_SCORERS``:

- en: rouge-score, Porter stemmer on (the original detector's scorer, unchanged);
- de: rouge-score with a Unicode-aware tokenizer: lower-cased, split at non-word characters, umlauts and ß kept,
  no stemming (the Porter stemmer is English);
- zh: rouge-chinese over jieba word segmentation (``' '.join(jieba.cut(text))``), punctuation tokens dropped.

All report ROUGE-1 recall x 100.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Callable

from lm_eval_retrieval.errors import UserInputError

__all__ = [
    "rouge1_recall", "needle_found", "known_languages", "chinese_tokens", "UnicodeWordTokenizer", "ENGLISH_USE_STEMMER"
]

#: The original detector (nightdessert/Retrieval_Head, ``retrieval_head_detection.py``) builds
#: ``rouge_scorer.RougeScorer(['rouge1', 'rougeL'], use_stemmer=True)``; the stemmer changes recall for inflected
#: answers ("sandwiches" vs "sandwich"), and with it which runs pass the gate, so it is kept on.
ENGLISH_USE_STEMMER = True

_english_scorer: Any = None


def _get_english_scorer() -> Any:
    """Build the rouge-score scorer once: construction loads the stemmer, too slow to repeat per document."""
    global _english_scorer
    if _english_scorer is None:
        from rouge_score import rouge_scorer  # imported lazily so importing the plugin stays cheap

        _english_scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=ENGLISH_USE_STEMMER)
    return _english_scorer


def _rouge1_recall_en(prediction: str, reference: str) -> float:
    """English ROUGE-1 recall in percent, exactly as the original detector computed it."""
    if not re.search(r"[a-z0-9]", reference.lower()):
        # rouge-score keeps only [a-z0-9] tokens: such a reference scores 0 against anything, which would quietly
        # fail every run's gate. That is a wrong language setting or an empty answer, not a model failure.
        raise UserInputError(
            f"reference answer {_short(reference)} has no English words for ROUGE; "
            f"set the answer language to the answer's real language"
        )
    # rouge-score's argument order is (target, prediction).
    return float(_get_english_scorer().score(reference, prediction)["rouge1"].recall * 100)


class UnicodeWordTokenizer:
    """rouge-score tokenizer for languages written with spaces beyond ASCII: lower case, split at non-word chars.

    ``\\W`` is Unicode-aware in Python, so "Müller", "Straße" and "Gießkanne" stay whole words; no stemming.
    NFKC first, so full-width letters count as the ordinary ones.
    """

    _SPLIT = re.compile(r"[\W_]+")

    def tokenize(self, text: str) -> list[str]:
        return [token for token in self._SPLIT.split(unicodedata.normalize("NFKC", text).lower()) if token]


_german_scorer: Any = None


def _get_german_scorer() -> Any:
    global _german_scorer
    if _german_scorer is None:
        from rouge_score import rouge_scorer

        _german_scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False, tokenizer=UnicodeWordTokenizer())
    return _german_scorer


def _rouge1_recall_de(prediction: str, reference: str) -> float:
    """German ROUGE-1 recall in percent: rouge-score counting, Unicode words ("Müller" is not "Muller")."""
    if not UnicodeWordTokenizer().tokenize(reference):
        raise UserInputError(f"reference answer {_short(reference)} has no words for ROUGE; give the answer text")
    return float(_get_german_scorer().score(reference, prediction)["rouge1"].recall * 100)


def chinese_tokens(text: str) -> list[str]:
    """jieba's segmentation of ``text`` without whitespace and punctuation tokens, Latin letters lower-cased."""
    import jieba  # imported lazily: building its dictionary takes about a second

    if not getattr(chinese_tokens, "_quiet", False):
        import logging

        jieba.setLogLevel(logging.WARNING)  # it prints "Building prefix dict..." on stderr otherwise
        chinese_tokens._quiet = True  # type: ignore[attr-defined]
    tokens = []
    for token in jieba.cut(unicodedata.normalize("NFKC", text)):
        token = token.strip().lower()
        if token and not all(unicodedata.category(ch)[0] in "PSZ" for ch in token):
            tokens.append(token)
    return tokens


def _rouge1_recall_zh(prediction: str, reference: str) -> float:
    """Chinese ROUGE-1 recall in percent: rouge-chinese over jieba words."""
    from rouge_chinese import Rouge

    reference_tokens = chinese_tokens(reference)
    if not reference_tokens:
        raise UserInputError(f"reference answer {_short(reference)} has no words for ROUGE; give the answer text")
    prediction_tokens = chinese_tokens(prediction)
    if not prediction_tokens:
        return 0.0  # rouge-chinese raises on an empty hypothesis; an empty answer retrieved nothing
    scores = Rouge(metrics=["rouge-1"]).get_scores(" ".join(prediction_tokens), " ".join(reference_tokens))
    return float(scores[0]["rouge-1"]["r"] * 100)


#: language code -> ``fn(prediction, reference) -> recall in 0..100``.
_SCORERS: dict[str, Callable[[str, str], float]] = {
    "en": _rouge1_recall_en,
    "de": _rouge1_recall_de,
    "zh": _rouge1_recall_zh,
}


def known_languages() -> list[str]:
    """Languages ``rouge1_recall`` can score, for help texts and config checks."""
    return sorted(_SCORERS)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value).replace("\n", " ").replace("\r", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise UserInputError(f"{name} must be a string, got {type(value).__name__} {_short(value)}; pass the text")
    return value


def rouge1_recall(prediction: str, reference: str, language: str = "en") -> float:
    """ROUGE-1 recall of ``prediction`` against ``reference``, in percent (0-100).

    Recall, not F1, because a model may answer in a full sentence around the needle: what matters is how much of
    the answer it reproduced. A run counts for the retrieval score when this is above 50.
    """
    prediction = _check_text("prediction", prediction)
    reference = _check_text("reference", reference)
    if not isinstance(language, str):
        raise UserInputError(
            f"language must be a string such as 'en', got {_short(language)}; known: {', '.join(known_languages())}"
        )
    code = language.strip().lower()
    scorer = _SCORERS.get(code)
    if scorer is None:
        raise UserInputError(
            f"ROUGE for language {language!r} is not available; known: {', '.join(known_languages())}"
        )
    return scorer(prediction, reference)


def _strip_punct(text: str) -> str:
    """Strip whitespace and Unicode punctuation (categories P*) from both ends."""
    start, end = 0, len(text)
    while start < end and (text[start].isspace() or unicodedata.category(text[start]).startswith("P")):
        start += 1
    while end > start and (text[end - 1].isspace() or unicodedata.category(text[end - 1]).startswith("P")):
        end -= 1
    return text[start:end]


def _normalise(text: str) -> str:
    """NFKC (full-width forms), casefold (ß == ss), and every whitespace run as one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _is_cjk(ch: str) -> bool:
    """Scripts written without spaces between words, where a word boundary cannot be asked for."""
    code = ord(ch)
    return (
        0x2E80 <= code <= 0x9FFF  # CJK radicals, punctuation, kana, CJK unified ideographs
        or 0xAC00 <= code <= 0xD7AF  # Hangul syllables
        or 0xF900 <= code <= 0xFAFF  # CJK compatibility ideographs
        or 0x20000 <= code <= 0x3FFFF  # CJK extensions
    )


def _needs_boundary(ch: str) -> bool:
    return ch.isalnum() and not _is_cjk(ch)


def needle_found(prediction: str, answer: str) -> float:
    """1.0 if ``answer`` occurs in ``prediction`` (ignoring case, whitespace and surrounding punctuation), else 0.0.

    A stricter, easier to read check than ROUGE: the whole answer, verbatim. The answer must stand as whole words
    ("park" is not found in "parking", "7" not in "17"), except next to CJK characters, which have no spaces.
    """
    prediction = _check_text("prediction", prediction)
    answer = _check_text("answer", answer)
    needle = _strip_punct(_normalise(answer))
    if not needle:
        raise UserInputError(
            f"answer {_short(answer)} is empty after removing punctuation; give the needle's answer text"
        )
    haystack = _normalise(prediction)
    check_left, check_right = _needs_boundary(needle[0]), _needs_boundary(needle[-1])
    start = haystack.find(needle)
    while start != -1:
        end = start + len(needle)
        left_ok = not (check_left and start > 0 and _needs_boundary(haystack[start - 1]))
        right_ok = not (check_right and end < len(haystack) and _needs_boundary(haystack[end]))
        if left_ok and right_ok:
            return 1.0
        start = haystack.find(needle, start + 1)
    return 0.0
