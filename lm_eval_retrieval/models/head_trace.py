"""`retrieval-head-hf`: an HFLM that scores every attention head while it answers NIAH documents.

Each generate request is one needle document. The prompt (all but its last token) is prefilled at full backend speed
with no probe; then greedy decoding runs one token at a time with the retrieval probe on, so each step costs one score
row per head on top of plain generation. Scores accumulate across requests and are written, in the original tool's
one-line JSON format, to `<output_path>/head_score/<model>.json`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from tqdm import tqdm
from transformers import DynamicCache

from ..attention.probes import RetrievalScoreProbe
from ..errors import UserInputError
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


class RetrievalHeadLM(HookedHFLM):
    """HFLM plus a retrieval-score probe on every attention head during greedy answer decoding."""

    OWN_ARGS = ("max_new_tokens", "top_heads")

    def __init__(self, max_new_tokens: int = 50, top_heads: int = 20, **kwargs: Any) -> None:
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
        """`{"<layer>-<head>": [score per counted document]}`, documents in (task, doc_id) order so the file does not
        depend on how many processes ran or in which order they finished."""
        scores: dict[str, list[float]] = {f"{layer}-{head}": [] for layer, head in self._head_keys()}
        for document in sorted(self.documents.values(), key=lambda d: d.order):
            if document.scores is not None:
                for key, value in zip(scores, document.scores):
                    scores[key].append(value)
        return scores

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
        generated = self._decode_with_probe(prompt_ids, tracker, max_new, until)
        response = self._response_text(generated, until)
        language = doc.get("answer_language", doc.get("language", "en"))
        counted = rouge1_recall(response, doc["answer"], language) > ROUGE_GATE
        return TracedDocument(response=response, scores=tracker.scores().flatten().tolist() if counted else None)

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

    @torch.inference_mode()
    def _decode_with_probe(
        self, prompt_ids: torch.Tensor, tracker: RetrievalScoreTracker, max_new: int, until: list[str]
    ) -> list[int]:
        state = self.hook_state
        probe = RetrievalScoreProbe(state.num_layers, state.num_heads)
        cache = DynamicCache(config=self.model.config)
        import inspect  # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns, gone in 5.40)

        with_cache = {"cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values": cache}
        # The prefill runs unprobed: scores are only needed for the queries that produce answer tokens.
        self.model(prompt_ids[None, :-1], **with_cache, use_cache=True, logits_to_keep=1)
        stop_ids = self._stop_token_ids()
        token = prompt_ids[None, -1:]
        position = prompt_ids.numel() - 1
        generated: list[int] = []
        state.probes.append(probe)
        try:
            for _ in range(max_new):
                logits = self.model(token, **with_cache, use_cache=True).logits
                next_token = logits[0, -1].argmax()
                tracker.update(position - probe.take_step(), next_token)
                token_id = int(next_token)
                generated.append(token_id)
                if token_id in stop_ids or self._should_stop(generated, until):
                    break
                token = next_token.view(1, 1)
                position += 1
        finally:
            state.probes.remove(probe)
        return generated

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
        return os.path.join(self.output_dir, "head_score", f"{self.model_name}.json")

    def ranked_heads(self) -> list[tuple[int, int, float]]:
        scores = {tuple(int(x) for x in key.split("-")): values for key, values in self.head_scores.items()}
        return rank_heads(scores)

    def _report(self) -> None:
        """Gather every process's documents on rank 0, write the head-score file there (atomically) and say how
        many documents counted."""
        gathered = self.gather_to_rank0(self.documents)
        for other in (gathered or [])[1:]:
            self.documents.update(other)
        if self.rank != 0:
            return
        summary = f"{self.documents_counted}/{self.documents_run} documents passed the ROUGE-1 > {ROUGE_GATE:g} gate"
        if self.documents_skipped:
            summary += f" ({self.documents_skipped} skipped: longer than the model's max length)"
        if self.documents_run and not self.documents_counted:
            log.warning(
                "NO document counted (%s): every answer was wrong, so every head score is empty. Likely causes: "
                "contexts too long for this model, a missing chat template, or too few max_new_tokens.",
                summary,
            )
        else:
            log.info(summary)
        write_head_scores(self.head_score_path, self.head_scores)
        log.info("head scores written to %s", self.head_score_path)

    def get_model_info(self) -> dict:
        top = [
            {"layer": layer, "head": head, "score": round(score, 4)}
            for layer, head, score in self.ranked_heads()[: self.top_heads]
        ]
        return {
            **super().get_model_info(),
            "retrieval_heads": {
                "model": self.model_name,
                "base_attn": self.base_attn,
                "documents_run": self.documents_run,
                "documents_counted": self.documents_counted,
                "documents_skipped": self.documents_skipped,
                "head_score_file": os.path.abspath(self.head_score_path),
                "top_heads": top,
            },
        }
