"""Haystack text: the long, needle-free prose that a needle is hidden in.

The project ships no prose written elsewhere (see shared/HAYSTACKS.md), so the defaults are text that is always
installed (CPython's own `pydoc_data.topics`, PSF licence) or written for the project (the synthetic "noise"
haystack, in the style of RULER). Researchers who want the original's Paul Graham essays or SlimPajama samples pass
their own file with `path=`.
"""

from __future__ import annotations

import functools
import importlib
import json
import random
import re
import textwrap
from pathlib import Path

from lm_eval_retrieval.errors import UserInputError

LANGUAGES: tuple[str, ...] = ("en",)
SOURCES: tuple[str, ...] = ("auto", "pydoc", "noise", "file")
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
}
NOISE_MIN_CHARS = 320_000
NOISE_SEED = 1234


def load_haystack_text(language: str = "en", source: str = "auto", path: str | Path | None = None) -> str:
    """Return the haystack text for `language`: a user's file when `path` is given, else a bundled default.

    `source="auto"` (or `"pydoc"`) gives real prose, `"noise"` the synthetic haystack, `"file"` requires `path`.
    """
    if language not in LANGUAGES:
        raise UserInputError(f"unknown haystack language {language!r}; use one of: {', '.join(LANGUAGES)}")
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
    return _default_prose(language)


@functools.lru_cache(maxsize=None)
def _default_prose(language: str) -> str:
    """The real-prose default of a language (cached: it is rebuilt identically for every document otherwise)."""
    return _pydoc_prose()


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
        paragraph = " ".join(pending[:take])
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
