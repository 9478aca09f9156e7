"""`retrieval-head-hf`: an HFLM that scores every attention head while it answers NIAH documents.

Each generate request is one needle document. The prompt (all but its last token) is prefilled at full backend speed
with no probe; then greedy decoding runs one token at a time with the retrieval probe on, so each step costs one score
row per head on top of plain generation. Scores accumulate across requests and are written, in the original tool's
one-line JSON format, to `<output_path>/head_score/<model>.json`.

`scores=copy;mass;qr;distant` adds other definitions of a retrieval head, computed from the same documents in the same
pass (metrics/head_scores.py): `mass` (HeadKV) and `distant` (DuoAttention-style) from the attention weights of the
same decode steps; `qr` (QRHead) from the question's rows of the prefill (only those rows are scored) and one short
extra call, QRHead's null question, on a view of the cache's text before the question. Each goes to
`head_score/<model>.<score>.json`, in the same format.
"""

from __future__ import annotations

import inspect
import logging
import os
from copy import copy as shallow_copy
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch
from tqdm import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..attention.probes import QuestionRowsProbe, RetrievalScoreProbe
from ..errors import UserInputError
from ..metrics import head_score_mass
from ..metrics.head_score_distant import RECENT_TOKENS, SINK_TOKENS, DistantScoreTracker
from ..metrics.head_score_mass import MassScoreTracker, qa_f1
from ..metrics.head_score_qr import NULL_QUERY, qr_scores
from ..metrics.head_scores import DEFAULT_SCORES, GATES, PAPERS, SCORES, parse_scores, window_size
from ..metrics.retrieval_score import RetrievalScoreTracker, TranslationScoreTracker
from ..metrics.rouge import rouge1_recall
from ..report.heads import rank_heads, write_head_scores
from .base import HookedHFLM
from .resume import ResultStore

log = logging.getLogger(__name__)

ROUGE_GATE = 50.0
NEEDLE_DOC_KEYS = ("answer", "answer_char_start", "answer_char_end", "input")


def answer_token_span(offsets: list[tuple[int, int]], char_start: int, char_end: int) -> tuple[int, int]:
    """Token indices [start, end) of the tokens that overlap the answer's characters."""
    inside = [i for i, (a, b) in enumerate(offsets) if a < char_end and b > char_start and b > a]
    if not inside:
        raise UserInputError("the needle answer does not map to any prompt token; check the task's answer_char_start/end")
    return inside[0], inside[-1] + 1


@dataclass(frozen=True)
class TracedDocument:
    """One NIAH document's outcome: what the model answered and, when the answer passed the ROUGE gate, every head's
    retrieval score (flattened layer-major)."""

    response: str
    scores: list[float] | None
    skipped: bool = False
    order: tuple = ()
    # the other scores named in `scores=` ("mass", "qr", "distant"), None where the document did not count for one
    other: dict[str, list[float] | None] = field(default_factory=dict)


@dataclass
class QuestionPlan:
    """What QRHead's score needs of one prompt: where its question starts, the tokens from there on with the question
    replaced by the null query, and the needle's token span (the keys scored)."""

    start: int
    null_ids: torch.Tensor
    keys: tuple[int, int]
    probe: QuestionRowsProbe | None = None  # filled by the prefill


@dataclass
class ExtraScores:
    """The scores of one document besides copy: trackers fed by every decode step, and QRHead's plan."""

    mass: MassScoreTracker | None = None
    distant: DistantScoreTracker | None = None
    question: QuestionPlan | None = None
    mass_answer: str = ""  # the text HeadKV's gate grades
    mass_language: str = "en"

    @property
    def step_trackers(self) -> list:
        return [t for t in (self.mass, self.distant) if t is not None]


class RetrievalHeadLM(HookedHFLM):
    """HFLM plus a retrieval-score probe on every attention head during greedy answer decoding."""

    OWN_ARGS = ("max_new_tokens", "top_heads", "scores", "sink_tokens", "recent_tokens")

    def __init__(
        self,
        max_new_tokens: int = 50,
        top_heads: int = 20,
        scores: str = "copy",
        sink_tokens: int = SINK_TOKENS,
        recent_tokens: int = RECENT_TOKENS,
        **kwargs: Any,
    ) -> None:
        # `scores=copy,mass` reaches us as scores="copy" plus a key "mass" with no value where a parser lets it through
        extra = [key for key, value in list(kwargs.items()) if key in SCORES and value in ("", None)]
        for key in extra:
            kwargs.pop(key)
        self.score_names = parse_scores(";".join([str(scores), *extra]))
        self.sink_tokens = window_size("sink_tokens", sink_tokens)
        self.recent_tokens = window_size("recent_tokens", recent_tokens, minimum=1)
        super().__init__(**kwargs)
        self.max_new_tokens = int(max_new_tokens)
        self.top_heads = int(top_heads)
        self._store: ResultStore | None = None
        self.reset_scores()

    def reset_scores(self) -> None:
        """Start a new accumulation (the masking sweep runs several evaluations on one loaded model)."""
        self.documents: dict[str, TracedDocument] = {}

    @property
    def head_scores(self) -> dict[str, list[float]]:
        """`{"<layer>-<head>": [score per counted document]}` of the copy score (see `score_table`)."""
        return self.score_table("copy")

    def score_table(self, name: str = "copy") -> dict[str, list[float]]:
        """`{"<layer>-<head>": [score per counted document]}` of score `name`, documents in (task, doc_id) order so
        the file does not depend on how many processes ran or in which order they finished."""
        scores: dict[str, list[float]] = {f"{layer}-{head}": [] for layer, head in self._head_keys()}
        for document in sorted(self.documents.values(), key=lambda d: d.order):
            values = document.scores if name == "copy" else document.other.get(name)
            if values is not None:
                for key, value in zip(scores, values):
                    scores[key].append(value)
        return scores

    def counted(self, name: str = "copy") -> int:
        """Documents that count toward score `name` (its paper's gate passed)."""
        if name == "copy":
            return self.documents_counted
        return sum(d.other.get(name) is not None for d in self.documents.values())

    @property
    def documents_run(self) -> int:
        return sum(not d.skipped for d in self.documents.values())

    @property
    def documents_counted(self) -> int:
        return sum(d.scores is not None for d in self.documents.values())

    @property
    def documents_skipped(self) -> int:
        return sum(d.skipped for d in self.documents.values())

    # ----------------------------------------------------------------------------------------------------------
    # lm-eval entry point

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        responses, resumed = [], 0
        for request in tqdm(requests, desc="Detecting retrieval heads", disable=disable_tqdm or self.rank != 0):
            context, gen_kwargs = request.args
            key = self._request_key(request.args)
            order = (str(getattr(request, "task_name", "")), int(getattr(request, "doc_id", 0) or 0), int(request.idx))
            document = self.documents.get(key)  # a padding duplicate (lm-eval evens out ranks) is traced once
            if document is None and self._store is not None and (stored := self._store.get(key)) is not None:
                document, resumed = TracedDocument(**stored), resumed + 1
            if document is None:
                document = self._trace(context, request.doc, gen_kwargs)
                if self._store is not None:
                    self._store.put(key, asdict(document))
            self.documents[key] = replace(document, order=order)
            responses.append(document.response)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), document.response)
        if resumed:
            log.info("resumed %d of %d documents from %s", resumed, len(requests), self._store.path)
        self._report()
        return responses

    def use_result_cache(self, cache_file: str) -> None:
        """`--use_cache`: each finished document's response and head scores go into the cache file at once."""
        self._store = ResultStore(cache_file, "lmr_retrieval_heads")

    def _request_key(self, args: tuple) -> str:
        fingerprint = {
            "model": self.pretrained_arg,
            "max_new_tokens": self.max_new_tokens,
            "masked": [self.mask_mode, [list(h) for h in self.masked_heads]],
        }
        if self.score_names != DEFAULT_SCORES:  # a copy-only run keeps the keys it always had
            fingerprint["scores"] = [list(self.score_names), self.sink_tokens, self.recent_tokens]
        return ResultStore.key("generate_until", args, fingerprint)

    # ----------------------------------------------------------------------------------------------------------

    def trace_document(self, context: str, doc: dict, gen_kwargs: dict | None = None) -> str:
        """Greedy-answer one NIAH prompt outside lm-eval, scoring every head; returns the response text."""
        document = replace(self._trace(context, doc, gen_kwargs), order=("", len(self.documents), 0))
        self.documents[f"direct-{len(self.documents)}"] = document
        return document.response

    def _trace(self, context: str, doc: dict, gen_kwargs: dict | None) -> TracedDocument:
        missing = [key for key in NEEDLE_DOC_KEYS if key not in (doc or {})]
        if missing:
            raise UserInputError(
                f"this task's documents have no needle span ({', '.join(missing)} missing); retrieval-head-hf runs "
                "NIAH tasks such as niah_retrieval_heads_en"
            )
        offset = context.find(doc["input"])
        if offset < 0:
            raise UserInputError(
                "the request text does not contain the document's prompt; drop --apply_chat_template (the NIAH tasks "
                "apply the chat template themselves)"
            )
        encoded = self.tokenizer(context, return_offsets_mapping=True, add_special_tokens=bool(self.add_bos_token))
        prompt_ids = torch.tensor(encoded["input_ids"], device=self.device)
        max_new = min(self.max_new_tokens, int((gen_kwargs or {}).get("max_gen_toks", self.max_new_tokens)))
        if prompt_ids.numel() + max_new > self.max_length:
            log.warning(
                "skipped a document of %d tokens (+%d to generate): it does not fit %s's max length %d, and a "
                "truncated haystack would lose the needle; use smaller context_lengths",
                prompt_ids.numel(), max_new, self.model_name, self.max_length,
            )
            return TracedDocument(response="", scores=None, skipped=True)
        span = answer_token_span(
            encoded["offset_mapping"], offset + doc["answer_char_start"], offset + doc["answer_char_end"]
        )
        until = [u for u in (gen_kwargs or {}).get("until", []) if u]
        tracker = self._tracker(prompt_ids, span, doc)
        extras = self._extra_scores(context, encoded["offset_mapping"], offset, span, doc)
        generated = self._decode_with_probe(prompt_ids, tracker, max_new, until, extras)
        response = self._response_text(generated, until)
        language = doc.get("answer_language", doc.get("language", "en"))
        counted = rouge1_recall(response, doc["answer"], language) > ROUGE_GATE
        return TracedDocument(
            response=response,
            scores=tracker.scores().flatten().tolist() if counted else None,
            other=self._other_scores(extras, generated),
        )

    def _extra_scores(
        self, context: str, offsets: list[tuple[int, int]], offset: int, span: tuple[int, int], doc: dict
    ) -> ExtraScores | None:
        """The trackers and plan of every score named besides copy, for one document (None: copy alone)."""
        names = set(self.score_names) - {"copy"}
        if not names:
            return None
        layers, heads = self.hook_state.num_layers, self.hook_state.num_heads
        # the needle sentence's tokens where the document names it, else the answer span (see head_score_mass / _qr)
        named = isinstance(doc.get("needle"), str) and isinstance(doc.get("needle_char_start"), int)
        needle = span
        if named:
            start = offset + doc["needle_char_start"]
            needle = answer_token_span(offsets, start, start + len(doc["needle"]))
        extras = ExtraScores()
        if "mass" in names:
            language = doc.get("language", "en")
            answer_language = doc.get("answer_language", language)
            extras.mass_answer = doc["needle"] if named and answer_language == language else doc["answer"]
            extras.mass_language = answer_language
            steps = len(self.tokenizer(extras.mass_answer, add_special_tokens=False)["input_ids"])
            extras.mass = MassScoreTracker(needle, steps, layers, heads)
        if "distant" in names:
            extras.distant = DistantScoreTracker(self.sink_tokens, self.recent_tokens, layers, heads)
        if "qr" in names:
            extras.question = self._question_plan(context, offsets, offset, needle, doc)
        return extras

    def _question_plan(
        self, context: str, offsets: list[tuple[int, int]], offset: int, needle: tuple[int, int], doc: dict
    ) -> QuestionPlan:
        """QRHead's query span (the question to the end of the prompt) and its null twin ("N/A" for the question)."""
        question = doc.get("question")
        found = doc["input"].rfind(question) if isinstance(question, str) and question else -1
        if found < 0:
            raise UserInputError(
                "scores=qr needs each document's question inside its prompt (a 'question' field); the bundled NIAH "
                "tasks have it: drop qr from scores= for this task"
            )
        char = offset + found
        start = next((i for i, (a, b) in enumerate(offsets) if b > char and b > a), len(offsets))
        if not 0 < start < len(offsets):
            raise UserInputError("scores=qr needs text before the question and the question among the prompt's tokens")
        null_text = context[offsets[start][0]:char] + NULL_QUERY + context[char + len(question):]
        null_ids = self.tokenizer(null_text, add_special_tokens=False)["input_ids"]
        return QuestionPlan(start, torch.tensor(null_ids, device=self.device), needle)

    def _other_scores(self, extras: ExtraScores | None, generated: list[int]) -> dict[str, list[float] | None]:
        """Each extra score of the document, or None where its paper's gate does not count the document."""
        if extras is None:
            return {}
        other: dict[str, list[float] | None] = {}
        if extras.mass is not None:
            # HeadKV grades the answer it decoded: at most |answer| tokens (see metrics/head_score_mass.py)
            text = self.tokenizer.decode(generated[: extras.mass.steps], skip_special_tokens=True).strip()
            passed = qa_f1(text, extras.mass_answer, extras.mass_language) > head_score_mass.GATE
            other["mass"] = extras.mass.scores().flatten().tolist() if passed else None
        if extras.question is not None and extras.question.probe is not None:
            rows = extras.question.probe
            other["qr"] = qr_scores(rows.mean("question"), rows.mean("null")).flatten().tolist()
        if extras.distant is not None:
            other["distant"] = extras.distant.scores().flatten().tolist()
        return other

    def _head_keys(self) -> list[tuple[int, int]]:
        return [(layer, head) for layer in range(self.hook_state.num_layers) for head in range(self.hook_state.num_heads)]

    def _tracker(self, prompt_ids: torch.Tensor, span: tuple[int, int], doc: dict) -> RetrievalScoreTracker:
        """Copy heads when the answer is in the needle's language, translation heads when it is not."""
        state = self.hook_state
        language = doc.get("language", "en")
        answer_language = doc.get("answer_language", language)
        if answer_language == language:
            return RetrievalScoreTracker(prompt_ids, span, state.num_layers, state.num_heads)
        gold = self.tokenizer(doc["answer"], add_special_tokens=False)["input_ids"]
        return TranslationScoreTracker(prompt_ids, span, gold, state.num_layers, state.num_heads)

    def _decode_with_probe(
        self,
        prompt_ids: torch.Tensor,
        tracker: RetrievalScoreTracker,
        max_new: int,
        until: list[str],
        extras: ExtraScores | None = None,
    ) -> list[int]:
        stop_ids = self._stop_token_ids()

        def should_stop(generated: list[int]) -> bool:
            return generated[-1] in stop_ids or self._should_stop(generated, until)

        return traced_decode(self.model, self.hook_state, prompt_ids, tracker, max_new, should_stop, extras)

    def _stop_token_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        generation_config = getattr(self.model, "generation_config", None)
        eos = getattr(generation_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos])
        return {i for i in ids if i is not None}

    def _should_stop(self, generated: list[int], until: list[str]) -> bool:
        text = self.tokenizer.decode(generated[-4:], skip_special_tokens=False)
        if "\n" in text and self.tokenizer.decode(generated, skip_special_tokens=True).strip():
            return True
        return bool(until) and any(u in self.tokenizer.decode(generated, skip_special_tokens=False) for u in until)

    def _response_text(self, generated: list[int], until: list[str]) -> str:
        text = self.tokenizer.decode(generated, skip_special_tokens=True).strip()
        for stop in [*until, "\n"]:
            text = text.split(stop)[0]
        return text.strip()

    # ----------------------------------------------------------------------------------------------------------
    # results

    @property
    def head_score_path(self) -> str:
        return self.head_score_file("copy")

    def head_score_file(self, name: str = "copy") -> str:
        """`head_score/<model>.json` for the copy score, `head_score/<model>.<name>.json` for the others."""
        suffix = "" if name == "copy" else f".{name}"
        return os.path.join(self.output_dir, "head_score", f"{self.model_name}{suffix}.json")

    def ranked_heads(self, name: str = "copy") -> list[tuple[int, int, float]]:
        scores = {tuple(int(x) for x in key.split("-")): values for key, values in self.score_table(name).items()}
        return rank_heads(scores)

    def _report(self) -> None:
        """Gather every process's documents on rank 0, write the head-score file there (atomically) and say how
        many documents counted."""
        gathered = self.gather_to_rank0(self.documents)
        for other in (gathered or [])[1:]:
            self.documents.update(other)
        if self.rank != 0:
            return
        for name in self.score_names:
            self._report_score(name)

    def _report_score(self, name: str) -> None:
        """Say how many documents counted toward score `name` and write its head-score file."""
        counted = self.counted(name)
        if name == "copy":
            summary = f"{counted}/{self.documents_run} documents passed the ROUGE-1 > {ROUGE_GATE:g} gate"
        elif name == "mass":
            gate = f"HeadKV's QA-F1 > {head_score_mass.GATE:g} gate"
            summary = f"mass: {counted}/{self.documents_run} documents passed {gate}"
        else:
            summary = f"{name}: {counted}/{self.documents_run} documents counted (no answer gate)"
        if self.documents_skipped:
            summary += f" ({self.documents_skipped} skipped: longer than the model's max length)"
        if self.documents_run and not counted:
            log.warning(
                "NO document counted (%s): every answer was wrong, so every head score is empty. Likely causes: "
                "contexts too long for this model, a missing chat template, or too few max_new_tokens.",
                summary,
            )
        else:
            log.info(summary)
        path = self.head_score_file(name)
        write_head_scores(path, self.score_table(name))
        log.info("%s head scores written to %s", name, path)

    def _top(self, name: str) -> list[dict]:
        return [
            {"layer": layer, "head": head, "score": round(score, 4)}
            for layer, head, score in self.ranked_heads(name)[: self.top_heads]
        ]

    def _score_info(self, name: str) -> dict:
        """One score's entry in the results JSON: its paper, which documents count, the file and its top heads."""
        info = {
            "paper": PAPERS[name],
            "gate": GATES[name],
            "documents_counted": self.counted(name),
            "head_score_file": os.path.abspath(self.head_score_file(name)),
            "top_heads": self._top(name),
        }
        if name == "distant":
            info.update(sink_tokens=self.sink_tokens, recent_tokens=self.recent_tokens)
        return info

    def get_model_info(self) -> dict:
        return {
            **super().get_model_info(),
            "retrieval_heads": {
                "model": self.model_name,
                "base_attn": self.base_attn,
                "documents_run": self.documents_run,
                "documents_counted": self.documents_counted,
                "documents_skipped": self.documents_skipped,
                "head_score_file": os.path.abspath(self.head_score_path) if "copy" in self.score_names else None,
                "top_heads": self._top("copy"),
                "scores": {name: self._score_info(name) for name in self.score_names},
            },
        }


def _cache_kwarg(model: Any) -> str:
    """transformers 5.24 renamed `past_key_values` to `cache` (the old name warns, gone in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def fork_cache(cache: DynamicCache, length: int | None = None) -> DynamicCache:
    """A cache that continues from `cache`'s state, or from its first `length` positions, without changing it: cache
    layers replace their tensors when they grow (`torch.cat`, never in place), so shallow copies of the layers share
    every tensor (a prefix is a view) and copy nothing. A prefix needs full-attention layers (`DynamicLayer`)."""
    forked = shallow_copy(cache)
    forked.layers = [shallow_copy(layer) for layer in cache.layers]
    if length is not None:
        for layer in forked.layers:
            layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]
    return forked


@torch.inference_mode()
def traced_decode(
    model: Any,
    state: Any,
    prompt_ids: torch.Tensor,
    tracker: RetrievalScoreTracker,
    max_new: int,
    should_stop: Callable[[list[int]], bool],
    extras: ExtraScores | None = None,
) -> list[int]:
    """Prefill `prompt_ids` (all but the last token) and greedy-decode up to `max_new` tokens with the retrieval probe
    on every step, feeding `tracker` and the trackers of `extras`; returns the generated token ids."""
    step_trackers = extras.step_trackers if extras is not None else []
    probe = RetrievalScoreProbe(state.num_layers, state.num_heads, keep_rows=bool(step_trackers))
    cache = DynamicCache(config=model.config)
    with_cache = {_cache_kwarg(model): cache}
    question = extras.question if extras is not None else None
    if question is None:
        # The prefill runs unprobed: scores are only needed for the queries that produce answer tokens.
        model(prompt_ids[None, :-1], **with_cache, use_cache=True, logits_to_keep=1)
    else:
        _prefill_with_question(model, state, prompt_ids, cache, question)
    token = prompt_ids[None, -1:]
    position = prompt_ids.numel() - 1
    generated: list[int] = []
    state.probes.append(probe)
    try:
        for _ in range(max_new):
            logits = model(token, **with_cache, use_cache=True).logits
            if question is not None and question.probe in state.probes:
                state.probes.remove(question.probe)  # the last prompt token was the question's last row
            next_token = logits[0, -1].argmax()
            tracker.update(position - probe.take_step(), next_token)
            if step_trackers:
                rows = probe.take_rows()
                for step_tracker in step_trackers:
                    step_tracker.update(rows, position + 1 - rows.shape[-1])
            generated.append(int(next_token))
            if should_stop(generated):
                break
            token = next_token.view(1, 1)
            position += 1
    finally:
        state.probes.remove(probe)
        if question is not None and question.probe in state.probes:
            state.probes.remove(question.probe)
    return generated


def _prefill_with_question(
    model: Any, state: Any, prompt_ids: torch.Tensor, cache: DynamicCache, question: QuestionPlan
) -> None:
    """The prefill for QRHead's score: the same one call as without it, its question rows scored by a probe (the
    others cost nothing); then the null question on a view of the cache's text before the question, discarded after.
    The probe stays on for the first decode step, whose query is the prompt's last token.

    A sliding-window layer no longer holds the keys before the question once the prefill is past them, so a model
    with one prefills in two calls (the text before the question, then the question) and forks the cache between."""
    cache_arg = _cache_kwarg(model)
    start, last = question.start, prompt_ids.numel() - 1
    rows = question.probe = QuestionRowsProbe(state.num_layers, question.keys)
    rows.first_row = start
    one_call = all(type(layer) is DynamicLayer for layer in cache.layers)
    first = 0 if one_call else start  # where the probed prefill call starts
    if not one_call:
        model(prompt_ids[None, :start], **{cache_arg: cache}, use_cache=True, logits_to_keep=1)
        before = fork_cache(cache)
    state.probes.append(rows)
    try:
        if first < last:
            rows.first_position = first
            model(prompt_ids[None, first:last], **{cache_arg: cache}, use_cache=True, logits_to_keep=1)
        if one_call:
            before = fork_cache(cache, start)
        rows.first_position, rows.target = start, "null"
        model(question.null_ids[None], **{cache_arg: before}, use_cache=True, logits_to_keep=1)
        rows.first_position, rows.target = last, "question"
    except BaseException:
        state.probes.remove(rows)
        raise
