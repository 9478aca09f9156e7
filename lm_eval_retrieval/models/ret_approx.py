"""`ret-approx-hf`: any lm-eval task, with every attention layer compared against a retrieval-based approximation.

The model runs as lm-eval's `hf` does; the approximation probe sits in every attention call (prefill and decode) and
adds up Recall@k, error norm and top-k attention mass per layer and head. After each request batch the reports are
(re)written beside lm-eval's results: `recall_table.md`, `recall_stats.json` and the heatmaps.
"""

from __future__ import annotations

import logging
import os
import types
from typing import Any, Callable

import torch

from ..attention.approx import resolve_approx
from ..attention.approx.contract import parse_approx_args, set_approx_args
from ..attention.budget import parse_budget
from ..attention.hook import probes_replaced
from ..attention.probes import MASS_CURVE_K, ApproxProbe, ApproxStats, nan_to_none
from ..errors import UserInputError
from .base import HookedHFLM, as_bool
from .masking import select_heads

log = logging.getLogger(__name__)


class RetApproxLM(HookedHFLM):
    """HFLM whose attention layers are analysed against `approx` (default exact top-k) on every forward pass."""

    OWN_ARGS = (
        "topk", "layerwise_topk_analysis", "approx", "approx_args", "min_visible_keys", "retrieval_top", "exact_heads",
        "exact_heads_random",
    )  # fmt: skip

    def __init__(
        self,
        topk: int | str = 10,
        layerwise_topk_analysis: bool | str = True,
        approx: str | Callable | None = "exact_topk",
        approx_args: str | dict | None = None,
        min_visible_keys: int | None = None,
        retrieval_top: int | str = 20,
        exact_heads: int | str | None = None,
        exact_heads_random: int | str | None = None,
        **kwargs: Any,
    ) -> None:
        budget = parse_budget(topk)
        approx_name, approx_fn = resolve_approx(approx)
        method_args = parse_approx_args(approx_args, approx_fn, approx_name)  # checked before the model loads
        super().__init__(**kwargs)
        state = self.hook_state
        self.layerwise = as_bool(layerwise_topk_analysis)
        self.probe = ApproxProbe(
            state.num_layers,
            state.num_heads,
            budget,
            layerwise=self.layerwise,
            min_visible_keys=None if min_visible_keys in (None, "") else int(min_visible_keys),
            approx_name=approx_name,
        )
        self.set_approx(approx_fn, approx_name, method_args)
        state.probes.append(self.probe)
        self._set_head_groups(retrieval_top, exact_heads, exact_heads_random)
        self._pending_lengths: list[int] | None = None
        self._all_stats: ApproxStats | None = None  # every process's statistics added up, on rank 0

    # ----------------------------------------------------------------------------------------------------------

    def attention_modules(self) -> list[torch.nn.Module]:
        names = set(self.hook_state.module_names)
        return [module for name, module in self.model.named_modules() if name in names]

    def set_approx(self, function: Callable, name: str | None = None, args: dict[str, Any] | None = None) -> None:
        """Use `function` (the `_approx_attn` contract) as every layer's approximation, with its parameters `args`
        (already checked, see approx/contract.py)."""
        for module in self.attention_modules():
            module._approx_attn = types.MethodType(function, module)
            set_approx_args(module, args or {})
        self.probe.approx_name = name or getattr(function, "__name__", "custom")
        self.approx_args = dict(args or {})
        prepare = getattr(function, "prepare", None)  # e.g. Loki's calibration on another text
        if prepare is not None:
            prepare(self)

    def _set_head_groups(self, retrieval_top: Any, exact_heads: Any, exact_heads_random: Any) -> None:
        """`head_scores=FILE`: the file's top `retrieval_top` heads are reported against all others (and marked on the
        heatmaps); `exact_heads=N` keeps its top N on exact attention, `exact_heads_random=N` (with `seed=`) N random
        heads outside that top N, the control."""
        shape = (self.hook_state.num_layers, self.hook_state.num_heads)
        scores = self._mask_args.get("head_scores")
        given = [name for name, value in (("exact_heads", exact_heads), ("exact_heads_random", exact_heads_random))
                 if value not in (None, "")]  # fmt: skip
        if len(given) > 1:
            raise UserInputError("give exact_heads=N or exact_heads_random=N, not both")
        if given and not scores:
            raise UserInputError(f"{given[0]} needs head_scores=<head_score/model.json> to rank the heads")
        try:
            top = min(int(retrieval_top), shape[0] * shape[1])  # the default 20 on a model with fewer heads: all
        except (TypeError, ValueError):
            raise UserInputError(f"retrieval_top must be a number of heads, got {retrieval_top!r}") from None
        self.retrieval_heads = select_heads(shape, mask_topk=top, head_scores=scores) if scores else []
        self.retrieval_top = top if scores else None
        self.exact_heads: list[tuple[int, int]] = []
        if given == ["exact_heads"]:
            self.exact_heads = select_heads(shape, mask_topk=exact_heads, head_scores=scores)
        elif given == ["exact_heads_random"]:
            seed = self._mask_args.get("seed", 0)
            self.exact_heads = select_heads(shape, mask_random=exact_heads_random, head_scores=scores, seed=seed)
        self.exact_heads_kind = given[0] if given else None
        self.probe.set_exact_heads(self.exact_heads)

    @property
    def topk(self) -> int | str:
        """The budget as given: a number of keys per query, or a share of each query's visible keys ("5%")."""
        return self.probe.topk

    def configure(self, approx: str | Callable, topk: int | str, approx_args: str | dict | None = None) -> None:
        """Another method and budget on the already loaded model, counted from zero (the leaderboard's runs)."""
        name, function = resolve_approx(approx)
        args = parse_approx_args(approx_args, function, name)
        self.probe.reset(parse_budget(topk))
        self._all_stats = None
        self.set_approx(function, name, args)

    # ----------------------------------------------------------------------------------------------------------
    # lm-eval entry points: run as HFLM does, then write the reports

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._each_request_once(super().loglikelihood, requests, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._each_request_once(super().loglikelihood_rolling, requests, disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._each_request_once(super().generate_until, requests, disable_tqdm)

    def _each_request_once(self, run: Callable, requests: list, disable_tqdm: bool) -> list:
        """Run HFLM's method on the distinct requests, then write the reports.

        With several processes lm-eval pads the shorter ranks by repeating their last request, and HFLM's rolling
        loglikelihood pads them with copies of their first window, so that all ranks run equally many batches;
        analysing a copy would count its queries twice. Our forwards need no lock-step (each rank runs its own model
        copy and the statistics are added up afterwards), so each rank runs only its distinct requests, unpadded."""
        distinct = list({id(request): request for request in requests}.values())
        world_size, self._world_size = self._world_size, 1
        try:
            outputs = run(distinct, disable_tqdm=disable_tqdm)
        finally:
            self._world_size = world_size
        results = dict(zip(map(id, distinct), outputs))
        self.write_reports()
        return [results[id(request)] for request in requests]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """HFLM right-pads loglikelihood batches without a mask; record the true lengths so padding is masked.

        HFLM also keeps only the last `max_length` tokens of a longer request: say so, never truncate silently."""
        import lm_eval.models.huggingface as hf

        too_long = [len(context) + len(continuation) for _, context, continuation in requests
                    if len(context) + len(continuation) > self.max_length + 1]
        if too_long:
            log.warning(
                "%d request(s) longer than %s's max length %d (longest %d tokens): lm-eval keeps only their last %d "
                "tokens, so the analysis sees a truncated context; use shorter documents or loglikelihood_rolling",
                len(too_long), self.model_name, self.max_length, max(too_long), self.max_length,
            )

        original = hf.pad_and_concat

        def recording(max_length: int, tensors: list, padding_side: str = "right"):
            self._pending_lengths = [t.shape[-1] for t in tensors] if padding_side == "right" else None
            return original(max_length, tensors, padding_side=padding_side)

        hf.pad_and_concat = recording
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            hf.pad_and_concat = original
            self._pending_lengths = None

    def _detect_batch_size(self, *args: Any, **kwargs: Any) -> int:
        """batch_size=auto probes memory with dummy batches: those must not enter the statistics."""
        with probes_replaced(self.hook_state, []):
            return super()._detect_batch_size(*args, **kwargs)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        lengths, self._pending_lengths = self._pending_lengths, None
        if attn_mask is None and labels is None and lengths is not None and len(lengths) == inps.shape[0]:
            positions = torch.arange(inps.shape[1], device=inps.device)
            mask = (positions[None, :] < torch.tensor(lengths, device=inps.device)[:, None]).long()
            with torch.no_grad():
                return self.model(inps, attention_mask=mask).logits
        return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    # ----------------------------------------------------------------------------------------------------------
    # results

    @property
    def report_dir(self) -> str:
        """Beside lm-eval's results JSON: `<output_path>/<sanitized model name>/`."""
        from lm_eval.utils import sanitize_model_name

        return os.path.join(self.output_dir, sanitize_model_name(self.pretrained_arg))

    def recall_stats(self) -> dict[str, Any]:
        stats = self._all_stats or self.probe.stats
        means = {name: stats.means(name) for name in stats.FIELDS}
        layers = []
        for layer, module_name in enumerate(self.hook_state.module_names):
            entry = {"layer": layer, "module": module_name, "queries": [int(q) for q in stats.queries[layer]]}
            entry.update({name: nan_to_none(means[name][layer]) for name in stats.FIELDS})
            layers.append(entry)
        return {
            "model": self.model_name,
            "approx": self.probe.approx_name,
            "approx_args": self.approx_args,
            "topk": self.topk,
            "layerwise_topk_analysis": self.layerwise,
            "min_visible_keys": self.probe.min_visible_keys,
            "layers": layers,
            "mass_curve": {"k": list(MASS_CURVE_K), "mass": nan_to_none(stats.curve())},
            **self._head_group_stats(stats),
        }

    def _head_group_stats(self, stats: ApproxStats) -> dict[str, Any]:
        """The retrieval heads of `head_scores=` against all other heads, and the heads kept exact, for the JSON."""
        out: dict[str, Any] = {}
        if self.exact_heads:
            out["exact_heads"] = {"kind": self.exact_heads_kind, "heads": [f"{layer}-{head}" for layer, head in self.exact_heads]}
        if not self.retrieval_heads:
            return out
        chosen = torch.zeros_like(stats.queries, dtype=torch.bool)
        for layer, head in self.retrieval_heads:
            chosen[layer, head] = True

        def means(where: torch.Tensor) -> dict[str, float | None]:
            counted = float(stats.queries[where].sum())
            return {
                name: (float(stats.sums[name][where].sum()) / counted if counted else None)
                for name in ("recall", "error_norm", "approx_topk_mass")
            }

        out["retrieval_heads"] = {
            "head_scores": str(self._mask_args.get("head_scores")),
            "top": self.retrieval_top,
            "heads": [f"{layer}-{head}" for layer, head in self.retrieval_heads],
            "retrieval": means(chosen),
            "others": means(~chosen),
        }
        return out

    def write_reports(self) -> None:
        """Add up every process's sums and counts on rank 0 and write the tables and plots there."""
        gathered = self.gather_to_rank0(self.probe.stats)
        if self.rank != 0:
            return
        from ..report.recall import write_recall_reports
        from ..report.recall_stats import RecallStats

        self._all_stats = ApproxStats.total(gathered)
        stats = RecallStats.from_dict(self.recall_stats(), "ret-approx-hf statistics")  # checked once, here
        counted = int(self._all_stats.queries.sum())
        if counted == 0:
            log.warning(
                "no query had at least %d visible keys (min_visible_keys, with topk=%s), so nothing was counted: lower "
                "topk or use longer documents",
                self.probe.min_visible_keys,
                self.topk,
            )
        paths = write_recall_reports(stats, self.report_dir)
        log.info("recall reports written: %s", ", ".join(str(p) for p in paths))

    def get_model_info(self) -> dict:
        return {**super().get_model_info(), "retrieval_approx": self.recall_stats()}
