"""Needles: one invented fact per document, with the question that retrieves it and the span a model must copy.

The facts are written for this project and cannot be guessed or known from pre-training, so a correct answer can
only come from reading the context; that is what makes the heads that copy it "retrieval" heads. `answer` is an
exact substring of `needle` because the retrieval score counts decode steps whose top-1 attention lands inside the
answer span of the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from lm_eval_retrieval.errors import UserInputError


@dataclass(frozen=True)
class Needle:
    """An inserted sentence (`needle`), the question about it, and the answer span inside the sentence."""

    needle: str
    question: str
    answer: str
    language: str = "en"

    def __post_init__(self) -> None:
        # Validated here so a user's own needle fails at construction, not deep inside scoring.
        for name in ("needle", "question", "answer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise UserInputError(f"Needle.{name} must be a non-empty string; got {value!r}")
            if "\n" in value or "\r" in value:
                raise UserInputError(f"Needle.{name} must be one line; remove the newline from {value!r}")
        if self.answer not in self.needle:
            raise UserInputError(
                f"Needle.answer {self.answer!r} must be an exact substring of the needle sentence {self.needle!r}"
            )


NEEDLES: dict[str, list[Needle]] = {
    "en": [
        Needle(
            "The secret ingredient in Marta Kowalski's apple pie is a spoonful of smoked paprika.",
            "What is the secret ingredient in Marta Kowalski's apple pie?",
            "a spoonful of smoked paprika",
        ),
        Needle(
            "The lighthouse keeper on Brannock Island keeps his spare keys inside a hollow brass owl.",
            "Where does the lighthouse keeper on Brannock Island keep his spare keys?",
            "inside a hollow brass owl",
        ),
        Needle(
            "The password for the back door of the Elmsworth chess club is purple walrus seventeen.",
            "What is the password for the back door of the Elmsworth chess club?",
            "purple walrus seventeen",
        ),
        Needle(
            "Every rainy Sunday, Ines Okafor spends the afternoon repairing antique cuckoo clocks.",
            "What does Ines Okafor spend the afternoon doing every rainy Sunday?",
            "repairing antique cuckoo clocks",
        ),
        Needle(
            "The first prize at the Lower Haddon turnip festival was a copper kettle shaped like a swan.",
            "What was the first prize at the Lower Haddon turnip festival?",
            "a copper kettle shaped like a swan",
        ),
        Needle(
            "Captain Yusuf Demir hid the last map of the expedition inside a tin of peppermint tea.",
            "Where did Captain Yusuf Demir hide the last map of the expedition?",
            "inside a tin of peppermint tea",
        ),
        Needle(
            "The old sailboat of the Vasquez family is painted bright orange with green stripes.",
            "How is the old sailboat of the Vasquez family painted?",
            "bright orange with green stripes",
        ),
        Needle(
            "On her seventieth birthday, Greta Lindqvist started learning to play the bagpipes.",
            "What did Greta Lindqvist start learning on her seventieth birthday?",
            "to play the bagpipes",
        ),
    ],
}


def get_needles(language: str = "en") -> list[Needle]:
    """The built-in needles of `language` (a fresh list, so callers may shuffle or extend it)."""
    try:
        return list(NEEDLES[language])
    except (KeyError, TypeError):
        known = ", ".join(sorted(NEEDLES))
        raise UserInputError(f"no needles for language {language!r}; use one of: {known}") from None
