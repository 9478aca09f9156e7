"""The languages the NIAH documents support, and the checks of a (language, haystack, answer) triple.

`language` is the needle's and the question's language, `haystack_language` the context's, `answer_language` the
language the model is told to answer in. Any haystack works with any needle; an answer language other than the
needle's needs a gold answer in that language, which every built-in needle carries (`Needle.translations`).
"""

from __future__ import annotations

from lm_eval_retrieval.errors import UserInputError

LANGUAGES: tuple[str, ...] = ("en", "zh", "de")

# What joins two sentences of a haystack: Chinese is written without spaces between sentences.
SEPARATORS: dict[str, str] = {"en": " ", "zh": "", "de": " "}

# A language's name as written in a prompt of each language (used for "answer in <language>" instructions).
LANGUAGE_NAMES: dict[str, dict[str, str]] = {
    "en": {"en": "English", "zh": "Chinese", "de": "German"},
    "zh": {"en": "英文", "zh": "中文", "de": "德语"},
    "de": {"en": "Englisch", "zh": "Chinesisch", "de": "Deutsch"},
}


def check_language(value: object, role: str = "language") -> str:
    """`value` as a known language code, or a one-line error that names the supported ones."""
    code = value.strip().lower() if isinstance(value, str) else value
    if code not in LANGUAGES:
        raise UserInputError(f"unknown {role} {value!r}; supported languages: {', '.join(LANGUAGES)}")
    return code  # type: ignore[return-value]


def joiner(left_language: str, right_language: str) -> str:
    """What goes between a sentence of one language and the next: nothing only between two Chinese sentences."""
    return SEPARATORS[left_language] or SEPARATORS[right_language]
