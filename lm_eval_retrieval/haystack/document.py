"""Build one needle-in-a-haystack document, sized in the model's own tokens.

A retrieval head is only meaningful at a known context length and needle depth, so both are measured with the
tokenizer of the model under test: the final prompt (chat template included) is as long as asked, short by less
than one haystack sentence, and the needle sits at a sentence boundary at the asked fraction of the haystack's
tokens. Sentence token costs are computed once per (tokenizer, sentence list) and cached, so building many documents
tokenises each full prompt only about twice.

Languages: the needle and the question are in `needle.language`, which also picks the prompt template; the haystack
sentences are in `haystack_language` (Chinese sentences are joined without spaces, a sentence of another language
is set off by a space); `answer_language` is what the model is told to answer in. When it differs from the
needle's, the template asks for that language and the document's `answer` is the gold answer in it, while
`needle_answer` (and `answer_char_start/end`) stay the span the model reads in the needle.
"""

from __future__ import annotations

import bisect
import math
import operator
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.haystack.languages import LANGUAGE_NAMES, SEPARATORS, check_language, joiner
from lm_eval_retrieval.haystack.needles import Needle

# The prompt of the original retrieval-head detector, per language (the needle's and question's language);
# `{context}` and `{question}` are filled in.
TEMPLATES: dict[str, str] = {
    "en": "{context}\n\nBased on the content of the document, answer the question.\nQuestion: {question}\nAnswer:",
    "zh": "{context}\n\n请根据文档内容回答问题。\n问题：{question}\n答案：",
    "de": "{context}\n\nBeantworte die Frage anhand des Dokuments.\nFrage: {question}\nAntwort:",
}
# The same prompts asking for an answer in another language; `{answer_language}` is that language's name as the
# prompt's language writes it ("German", "德语", "Englisch"). A user's own template may use it too.
CROSS_LINGUAL_TEMPLATES: dict[str, str] = {
    "en": (
        "{context}\n\nBased on the content of the document, answer the question in {answer_language}.\n"
        "Question: {question}\nAnswer:"
    ),
    "zh": "{context}\n\n请根据文档内容，用{answer_language}回答问题。\n问题：{question}\n答案：",
    "de": "{context}\n\nBeantworte die Frage anhand des Dokuments auf {answer_language}.\nFrage: {question}\nAntwort:",
}


def prompt_template(language: str, answer_language: str | None = None) -> str:
    """The built-in template for a question in `language`, asking for `answer_language` when that differs."""
    if language not in TEMPLATES:
        raise UserInputError(f"no prompt template for language {language!r}; use one of: {', '.join(TEMPLATES)}")
    if answer_language is None or answer_language == language:
        return TEMPLATES[language]
    answer_language = check_language(answer_language, "answer language")
    return CROSS_LINGUAL_TEMPLATES[language].replace("{answer_language}", LANGUAGE_NAMES[language][answer_language])

_MARKER = "\ue000HAYSTACK-CONTEXT\ue000"  # stands for the context when the chat template is rendered once
_MAX_MEASURES = 4  # full-prompt tokenisations before settling for the best prompt that fits
_CHUNK_CHARS = 60_000  # sentences are tokenised in joined chunks of about this size


def build_document(
    tokenizer: Any,
    sentences: Sequence[str],
    needle: Needle,
    context_length: int,
    depth_percent: float,
    *,
    chat_template: bool = True,
    template: str | None = None,
    start: int = 0,
    haystack_language: str | None = None,
    answer_language: str | None = None,
) -> dict[str, Any]:
    """A prompt of `context_length` tokens with `needle` inserted at `depth_percent` of the haystack's tokens.

    `sentences` (whole sentences in `haystack_language`, e.g. from `split_sentences`) are used in order from index
    `start`, cycling when they run out. `haystack_language` and `answer_language` default to `needle.language`.
    Returns plain JSON-serialisable values: `answer` is the gold answer in the answer language (what ROUGE grades),
    `needle_answer` the span inside the needle, and `input[answer_char_start:answer_char_end] == needle_answer`.
    """
    length_limit, depth = _check_args(sentences, needle, context_length, depth_percent)
    if isinstance(start, bool) or not isinstance(start, int):
        raise UserInputError(f"start must be a sentence index (an integer); got {start!r}")
    language = needle.language
    haystack_language = check_language(
        language if haystack_language is None else haystack_language, "haystack language"
    )
    answer_language = check_language(language if answer_language is None else answer_language, "answer language")
    gold = needle.answer_in(answer_language)
    separator = SEPARATORS[haystack_language]
    needle_separator = joiner(haystack_language, language)
    if template is None:
        template = prompt_template(language, answer_language)
    else:
        template = template.replace("{answer_language}", LANGUAGE_NAMES[language][answer_language])
    head, tail = _prompt_frame(tokenizer, template, needle.question, chat_template)
    costs = _sentence_costs(tokenizer, tuple(sentences), separator)
    walk = _Walk(costs, len(sentences), start)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    base = count(head + needle.needle + tail)  # everything but the haystack
    minimum = base + walk.cost(0)
    if length_limit < minimum:
        raise UserInputError(
            f"context_length={length_limit} is too small for the template, question, needle and one haystack "
            f"sentence; use context_length >= {minimum}"
        )
    best: tuple[int, int] | None = None  # (length, sentence count) of the longest prompt that fits
    n = walk.fit(length_limit - base)
    tried: set[int] = set()
    while n >= 1 and n not in tried:
        tried.add(n)
        length = count(_assemble(head, tail, walk, n, depth, needle, separator, needle_separator)[0])
        if length <= length_limit and (best is None or length > best[0]):
            best = (length, n)
        error = length - base - walk.cum(n)  # how far the cached costs are off for this prompt
        if length > length_limit:
            n = min(n - 1, walk.fit(length_limit - base - error))
        elif len(tried) >= _MAX_MEASURES:
            break
        else:
            n = walk.fit(length_limit - base - error)  # the same n when the next sentence does not fit
    if best is None:
        raise UserInputError(f"context_length={length_limit} is too small for this template and needle; raise it")
    length, n = best
    prompt, needle_start = _assemble(head, tail, walk, n, depth, needle, separator, needle_separator)
    if chat_template and getattr(tokenizer, "chat_template", None):
        _check_chat_render(tokenizer, template, needle.question, prompt, head, tail)
    answer_start = needle_start + needle.needle.index(needle.answer)
    return {
        "input": prompt,
        "answer": gold,
        "needle_answer": needle.answer,
        "needle": needle.needle,
        "question": needle.question,
        "language": language,
        "haystack_language": haystack_language,
        "answer_language": answer_language,
        "context_length": length_limit,
        "length": length,
        "depth": depth,
        "answer_char_start": answer_start,
        "answer_char_end": answer_start + len(needle.answer),
        "needle_char_start": needle_start,
    }


def _check_args(
    sentences: Sequence[str], needle: Needle, context_length: Any, depth_percent: Any
) -> tuple[int, float]:
    """Reject bad input with one-line messages before any tokenisation."""
    if not isinstance(needle, Needle):
        raise UserInputError(f"needle must be a Needle (see get_needles()); got {type(needle).__name__}")
    if needle.language not in TEMPLATES:
        raise UserInputError(f"no prompt template for language {needle.language!r}; use one of: {', '.join(TEMPLATES)}")
    try:
        if isinstance(context_length, bool):
            raise TypeError
        length = operator.index(context_length)
    except TypeError:
        raise UserInputError(f"context_length must be a whole number of tokens; got {context_length!r}") from None
    if length <= 0:
        raise UserInputError(f"context_length must be positive; got {length}")
    try:
        depth = float(depth_percent)
    except (TypeError, ValueError):
        raise UserInputError(f"depth_percent must be a number from 0 to 100; got {depth_percent!r}") from None
    if math.isnan(depth) or not 0.0 <= depth <= 100.0:
        raise UserInputError(f"depth_percent must be from 0 to 100; got {depth_percent!r}")
    if isinstance(sentences, str) or len(sentences) == 0:
        raise UserInputError("sentences must be a non-empty list of sentences; build it with split_sentences(text)")
    if any(not isinstance(s, str) or not s.strip() for s in sentences):
        raise UserInputError("every haystack sentence must be a non-empty string; build them with split_sentences()")
    return length, depth


def _prompt_frame(tokenizer: Any, template: str, question: str, chat_template: bool) -> tuple[str, str]:
    """The final prompt's text before and after the context (chat template applied once, with a marker)."""
    if template.count("{context}") != 1 or "{question}" not in template:
        raise UserInputError("template must contain '{context}' exactly once and '{question}'; fix the template")
    content = _user_content(template, question, _MARKER)
    if chat_template and getattr(tokenizer, "chat_template", None):
        content = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    if not isinstance(content, str) or content.count(_MARKER) != 1:
        raise UserInputError("the chat template does not keep the user message verbatim; pass chat_template=False")
    head, tail = content.split(_MARKER)
    return head, tail


def _assemble(
    head: str, tail: str, walk: _Walk, n: int, depth: float, needle: Needle, separator: str, needle_separator: str
) -> tuple[str, int]:
    """The prompt with `n` haystack sentences and the needle at the boundary nearest `depth` % of their tokens.

    `separator` joins haystack sentences, `needle_separator` sets the needle off from its neighbours.
    """
    target = depth / 100.0 * walk.cum(n)
    above = min(n, walk.boundary(target))  # first boundary at or past the target; the one before is below it
    k = min((max(0, above - 1), above), key=lambda b: abs(walk.cum(b) - target))
    before = separator.join(walk.sentence(i) for i in range(k))
    after = separator.join(walk.sentence(i) for i in range(k, n))
    lead = before + needle_separator if k else ""
    context = lead + needle.needle + (needle_separator + after if k < n else "")
    return head + context + tail, len(head) + len(lead)


def _user_content(template: str, question: str, context: str) -> str:
    """The template filled in; split at `{context}` first so braces inside the haystack are never touched."""
    before, after = template.split("{context}")
    return before.replace("{question}", question) + context + after.replace("{question}", question)


def _check_chat_render(tokenizer: Any, template: str, question: str, prompt: str, head: str, tail: str) -> None:
    """Render the chat template once on the real content: the marker-built prompt must be exactly what it gives."""
    context = prompt[len(head) : len(prompt) - len(tail)]
    messages = [{"role": "user", "content": _user_content(template, question, context)}]
    if tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) != prompt:
        raise UserInputError("the chat template changes the document text; pass chat_template=False")


class _Walk:
    """Haystack sentences taken in order from `start`, cycling, with lazily extended prefix sums of token costs."""

    def __init__(self, costs: _SentenceCosts, size: int, start: int) -> None:
        self._costs = costs
        self._size = size
        self._start = start % size
        self._cum = [0]

    def sentence(self, i: int) -> str:
        return self._costs.sentences[(self._start + i) % self._size]

    def cost(self, i: int) -> int:
        return self._costs.get((self._start + i) % self._size)

    def cum(self, n: int) -> int:
        """Tokens of the first `n` haystack sentences."""
        while len(self._cum) <= n:
            self._cum.append(self._cum[-1] + self.cost(len(self._cum) - 1))
        return self._cum[n]

    def fit(self, budget: float) -> int:
        """The most sentences whose tokens stay within `budget`."""
        while self._cum[-1] <= budget:
            if len(self._cum) > self._size and self._cum[-1] == self._cum[-1 - self._size]:
                raise UserInputError("the haystack sentences tokenise to nothing; use real text")
            self.cum(len(self._cum))
        return bisect.bisect_right(self._cum, budget) - 1

    def boundary(self, target: float) -> int:
        """The first boundary whose prefix holds at least `target` tokens (prefix sums must cover it)."""
        return bisect.bisect_left(self._cum, target)


class _SentenceCosts:
    """Token count of each sentence as it sits inside the joined haystack, tokenised in chunks on demand."""

    def __init__(self, tokenizer: Any, sentences: tuple[str, ...], separator: str) -> None:
        self.sentences = sentences
        self._tokenizer = tokenizer
        self._separator = separator
        self._costs: list[int] = []

    def get(self, index: int) -> int:
        while len(self._costs) <= index:
            self._extend()
        return self._costs[index]

    def _extend(self) -> None:
        first = len(self._costs)
        last, size = first, 0
        while last < len(self.sentences) and (last == first or size < _CHUNK_CHARS):
            size += len(self.sentences[last]) + len(self._separator)
            last += 1
        chunk = self.sentences[first:last]
        if not getattr(self._tokenizer, "is_fast", False):  # no offsets: count each sentence with its separator
            encoded = self._tokenizer([self._separator + s for s in chunk], add_special_tokens=False)["input_ids"]
            self._costs.extend(len(ids) for ids in encoded)
            return
        text = self._separator.join(chunk)
        bounds, position = [], 0  # a sentence owns the separator before it
        for sentence in chunk:
            bounds.append(max(0, position - len(self._separator)))
            position += len(sentence) + len(self._separator)
        counts = [0] * len(chunk)
        offsets = self._tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for token_start, _ in offsets:
            counts[bisect.bisect_right(bounds, token_start) - 1] += 1
        self._costs.extend(counts)


_CACHE: weakref.WeakKeyDictionary[Any, OrderedDict[tuple[tuple[str, ...], str], _SentenceCosts]]
_CACHE = weakref.WeakKeyDictionary()
_CACHE_PER_TOKENIZER = 8


def _sentence_costs(tokenizer: Any, sentences: tuple[str, ...], separator: str) -> _SentenceCosts:
    """The cached cost table of a tokenizer and sentence list (uncached if the tokenizer cannot be weakly held)."""
    try:
        per_tokenizer = _CACHE.setdefault(tokenizer, OrderedDict())
    except TypeError:
        return _SentenceCosts(tokenizer, sentences, separator)
    key = (sentences, separator)
    table = per_tokenizer.get(key)
    if table is None:
        table = per_tokenizer[key] = _SentenceCosts(tokenizer, sentences, separator)
        while len(per_tokenizer) > _CACHE_PER_TOKENIZER:
            per_tokenizer.popitem(last=False)
    per_tokenizer.move_to_end(key)
    return table
