"""`retrieval-head-hf`: an HFLM that scores every attention head while it answers NIAH documents.

Each generate request is one needle document. The prompt (all but its last token) is prefilled at full backend speed
with no probe; then greedy decoding runs one token at a time with the retrieval probe on, so each step costs one score
row per head on top of plain generation. Scores accumulate across requests and are written, in the original tool's
one-line JSON format, to `<output_path>/head_score/<model>.json`.
"""

from __future__ import annotations

import logging
import os
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

log = logging.getLogger(__name__)

ROUGE_GATE = 50.0
NEEDLE_DOC_KEYS = ("answer", "answer_char_start", "answer_char_end", "input")


def answer_token_span(offsets: list[tuple[int, int]], char_start: int, char_end: int) -> tuple[int, int]:
    """Token indices [start, end) of the tokens that overlap the answer's characters."""
    inside = [i for i, (a, b) in enumerate(offsets) if a < char_end and b > char_start and b > a]
    if not inside:
        raise UserInputError("the needle answer does not map to any prompt token; check the task's answer_char_start/end")
    return inside[0], inside[-1] + 1


class RetrievalHeadLM(HookedHFLM):
    """HFLM plus a retrieval-score probe on every attention head during greedy answer decoding."""

    OWN_ARGS = ("max_new_tokens", "top_heads")

    def __init__(self, max_new_tokens: int = 50, top_heads: int = 20, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_new_tokens = int(max_new_tokens)
        self.top_heads = int(top_heads)
        self.reset_scores()

    def reset_scores(self) -> None:
        """Start a new accumulation (the masking sweep runs several evaluations on one loaded model)."""
        self.head_scores: dict[str, list[float]] = {
            f"{layer}-{head}": []
            for layer in range(self.hook_state.num_layers)
            for head in range(self.hook_state.num_heads)
        }
        self.documents_run = 0
        self.documents_counted = 0

    # ----------------------------------------------------------------------------------------------------------
    # lm-eval entry point

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        responses = []
        for request in tqdm(requests, desc="Detecting retrieval heads", disable=disable_tqdm or self.rank != 0):
            context, gen_kwargs = request.args
            response = self.trace_document(context, request.doc, gen_kwargs)
            responses.append(response)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), response)
        self._report()
        return responses

    # ----------------------------------------------------------------------------------------------------------

    def trace_document(self, context: str, doc: dict, gen_kwargs: dict | None = None) -> str:
        """Greedy-answer one NIAH prompt, scoring every head; returns the response text."""
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
        span = answer_token_span(
            encoded["offset_mapping"], offset + doc["answer_char_start"], offset + doc["answer_char_end"]
        )
        max_new = min(self.max_new_tokens, int((gen_kwargs or {}).get("max_gen_toks", self.max_new_tokens)))
        if prompt_ids.numel() + max_new > self.max_length:
            raise UserInputError(
                f"a document of {prompt_ids.numel()} tokens (+{max_new} to generate) does not fit {self.model_name}'s "
                f"max length {self.max_length}; use smaller context_lengths"
            )
        until = [u for u in (gen_kwargs or {}).get("until", []) if u]
        tracker = self._tracker(prompt_ids, span, doc)
        generated = self._decode_with_probe(prompt_ids, tracker, max_new, until)
        response = self._response_text(generated, until)
        self.documents_run += 1
        if rouge1_recall(response, doc["answer"], doc.get("answer_language", doc.get("language", "en"))) > ROUGE_GATE:
            self.documents_counted += 1
            for (layer, head), score in zip(self._head_keys(), tracker.scores().flatten().tolist()):
                self.head_scores[f"{layer}-{head}"].append(score)
        return response

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
        # The prefill runs unprobed: scores are only needed for the queries that produce answer tokens.
        self.model(prompt_ids[None, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1)
        stop_ids = self._stop_token_ids()
        token = prompt_ids[None, -1:]
        position = prompt_ids.numel() - 1
        generated: list[int] = []
        state.probes.append(probe)
        try:
            for _ in range(max_new):
                logits = self.model(token, past_key_values=cache, use_cache=True).logits
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
        """Write the head-score file (rank 0, atomically) and say how many documents counted."""
        summary = f"{self.documents_counted}/{self.documents_run} documents passed the ROUGE-1 > {ROUGE_GATE:g} gate"
        if self.documents_run and not self.documents_counted:
            log.warning(
                "NO document counted (%s): every answer was wrong, so every head score is empty. Likely causes: "
                "contexts too long for this model, a missing chat template, or too few max_new_tokens.",
                summary,
            )
        else:
            log.info(summary)
        if self.rank == 0:
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
                "head_score_file": os.path.abspath(self.head_score_path),
                "top_heads": top,
            },
        }
