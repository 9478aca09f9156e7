"""Tests for lm_eval_retrieval.metrics.rouge: the ROUGE-1 recall gate and the needle-found check."""

from __future__ import annotations

import pytest

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.metrics import rouge
from lm_eval_retrieval.metrics.rouge import known_languages, needle_found, rouge1_recall

# The original detector's default needle answer.
NEEDLE = "eat a sandwich and sit in Dolores Park on a sunny day."


def _assert_one_line_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, UserInputError)
    assert message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ---------------------------------------------------------------------------------------------------------------
# rouge1_recall


def test_half_of_the_reference_is_fifty() -> None:
    # reference unigrams: the x2, cat, sat, on, mat = 6; the prediction covers the, cat, sat = 3 -> 3/6.
    assert rouge1_recall("the cat sat", "the cat sat on the mat") == pytest.approx(50.0)


def test_argument_order_is_prediction_then_reference() -> None:
    # The long text as the prediction contains every reference word: recall 100, not 50.
    assert rouge1_recall("the cat sat on the mat", "the cat sat") == pytest.approx(100.0)


def test_case_and_punctuation_are_ignored() -> None:
    assert rouge1_recall("THE CAT, SAT!", "the cat sat") == pytest.approx(100.0)


def test_no_common_word_is_zero() -> None:
    assert rouge1_recall("dogs bark", "the cat sat") == 0.0
    assert rouge1_recall("", "the cat sat") == 0.0


def test_stemming_matches_the_original_detector() -> None:
    # The original builds RougeScorer(['rouge1', 'rougeL'], use_stemmer=True): "eating" -> "eat",
    # "sandwiches" -> "sandwich", so 2 of the 3 reference words (eat, a, sandwich) are found: 2/3.
    assert rouge.ENGLISH_USE_STEMMER is True
    assert rouge1_recall("eating sandwiches", "eat a sandwich") == pytest.approx(200 / 3)


def test_typical_needle_answers_cross_the_gate_as_expected() -> None:
    # 12 reference tokens: eat a sandwich and sit in dolores park on a sunny day.
    full = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
    assert rouge1_recall(full, NEEDLE) == pytest.approx(100.0)
    # "sitting in Dolores Park" covers sit(stem), in, dolores, park = 4 of 12.
    assert rouge1_recall("sitting in Dolores Park", NEEDLE) == pytest.approx(100 * 4 / 12)
    assert rouge1_recall("sitting in Dolores Park", NEEDLE) <= 50


def test_agrees_with_the_original_scorer_call() -> None:
    from rouge_score import rouge_scorer

    original = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    responses = [
        "Eat a sandwich and sit in Dolores Park.",
        "I think the answer is going to the beach",
        "sandwiches in the park on sunny days",
        "",
    ]
    for response in responses:
        expected = original.score(NEEDLE, response)["rouge1"].recall * 100
        assert rouge1_recall(response, NEEDLE) == pytest.approx(expected)


def test_scorer_is_built_once() -> None:
    rouge1_recall("a", "a")
    first = rouge._english_scorer
    rouge1_recall("b", "b")
    assert first is not None and rouge._english_scorer is first


def test_language_code_is_case_insensitive() -> None:
    assert rouge1_recall("the cat sat", "the cat sat on the mat", language="EN") == pytest.approx(50.0)
    assert rouge1_recall("die Katze", "die Katze saß", language="DE") == pytest.approx(200 / 3)
    assert known_languages() == ["de", "en", "zh"]


@pytest.mark.parametrize("language", ["fr", "xx", "", "en-US"])
def test_unknown_language_is_user_error(language: str) -> None:
    with pytest.raises(UserInputError) as excinfo:
        rouge1_recall("a", "a", language=language)
    message = _assert_one_line_error(excinfo)
    assert message == f"ROUGE for language {language!r} is not available; known: de, en, zh"


def test_german_keeps_umlauts_and_does_not_stem() -> None:
    # rouge-score's default tokenizer would turn "Müller" into "m ller" and match "Muller" on "ller".
    assert rouge1_recall("Muller", "Müller", language="de") == 0.0
    assert rouge1_recall("MÜLLER!", "Müller", language="de") == pytest.approx(100.0)
    # No stemming: "Gärten" is not "Garten".
    assert rouge1_recall("Gärten", "Garten", language="de") == 0.0


def test_chinese_uses_word_segmentation() -> None:
    # jieba: 一罐 / 薄荷 / 茶里; the prediction has all three words (its punctuation is dropped).
    assert rouge1_recall("藏在了一罐薄荷茶里。", "一罐薄荷茶里", language="zh") == pytest.approx(100.0)
    assert rouge1_recall("", "一罐薄荷茶里", language="zh") == 0.0
    for reference in ["", "。！"]:
        with pytest.raises(UserInputError) as excinfo:
            rouge1_recall("北京", reference, language="zh")
        _assert_one_line_error(excinfo, "no words")


def test_reference_without_english_words_is_user_error() -> None:
    # rouge-score drops every non-ASCII letter: a Chinese answer would silently score 0 and fail every gate.
    for reference in ["北京", "", "...!?"]:
        with pytest.raises(UserInputError) as excinfo:
            rouge1_recall("北京", reference)
        _assert_one_line_error(excinfo, "no English words")


@pytest.mark.parametrize("prediction, reference, language", [(None, "a", "en"), ("a", 3, "en"), ("a", "a", None)])
def test_non_string_input_is_user_error(prediction: object, reference: object, language: object) -> None:
    with pytest.raises(UserInputError) as excinfo:
        rouge1_recall(prediction, reference, language=language)  # type: ignore[arg-type]
    _assert_one_line_error(excinfo)


# ---------------------------------------------------------------------------------------------------------------
# needle_found


@pytest.mark.parametrize(
    "prediction, answer",
    [
        ("The best thing is to eat a sandwich and sit in Dolores Park.", "Dolores Park"),
        ("dolores\n   PARK, on a sunny day", "  Dolores Park. "),  # case, whitespace runs, answer punctuation
        ('He said: "Dolores Park!"', "“Dolores Park”"),  # quotes around the answer are surrounding punctuation
        ("The number is 7.", "7"),
        ("The magic number is 42", "42."),
        ("答案是北京。", "北京"),  # no spaces in Chinese: no word boundary asked for
        ("Die STRASSE ist lang", "Straße"),  # casefold: ß == ss
        ("Ｄｏｌｏｒｅｓ Ｐａｒｋ", "Dolores Park"),  # full-width forms (NFKC)
        ("Answer: Dolores Park", "Dolores Park"),
    ],
)
def test_needle_found(prediction: str, answer: str) -> None:
    assert needle_found(prediction, answer) == 1.0


@pytest.mark.parametrize(
    "prediction, answer",
    [
        ("I went to the parking lot", "park"),  # not a whole word
        ("The number is 17.", "7"),
        ("The number is 71.", "7"),
        ("Dolores Street", "Dolores Park"),
        ("", "Dolores Park"),
        ("Dolores-Parkway", "Dolores Park"),
    ],
)
def test_needle_not_found(prediction: str, answer: str) -> None:
    assert needle_found(prediction, answer) == 0.0


def test_needle_found_checks_every_occurrence() -> None:
    # The first "park" is inside "parking", the second stands alone.
    assert needle_found("parking near the park", "park") == 1.0


@pytest.mark.parametrize("answer", ["", "   ", "...", "“”"])
def test_empty_answer_is_user_error(answer: str) -> None:
    with pytest.raises(UserInputError) as excinfo:
        needle_found("anything", answer)
    _assert_one_line_error(excinfo, "empty")


def test_needle_found_non_string_is_user_error() -> None:
    with pytest.raises(UserInputError) as excinfo:
        needle_found(None, "a")  # type: ignore[arg-type]
    _assert_one_line_error(excinfo, "prediction must be a string")
