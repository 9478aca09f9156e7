"""Probes: pure tensor code that looks at one attention call at a time. No model knowledge lives here."""

from __future__ import annotations

import math

import torch

from ..errors import UserInputError
from .approx.common import masked_logits, scores_against, sharing_chunk_logits, soft_capped
from .approx.contract import reset_state, take_scanned
from .approx.exact_topk import exact_topk
from .budget import Budget, parse_budget
from .hook import AttentionCall, cpu_attention_with_lse
from .set_metrics import id_set_metrics, id_set_step
from .topk import attend_topk, exact_step, mask_future, row_topk

MASS_CURVE_K = [2**i for i in range(11)]  # 1 .. 1024
NEG_INF = float("-inf")
NAN = float("nan")


def visible_mask(call: AttentionCall, q_start: int, q_end: int) -> torch.Tensor:
    """Bool (B, 1 or Hq, C, K): which keys queries q_start..q_end of this call may attend to.

    Reads whatever mask the model built (bool for sdpa, additive float for eager; padding and sliding windows are in
    it). A mask of None means plain causal attention over the whole cache, aligned bottom-right.
    """
    q_len, k_len = call.query.shape[2], call.key.shape[2]
    mask = call.attention_mask
    if mask is None:
        return _causal_mask(q_start + k_len - q_len, q_end - q_start, k_len, call.key.device)
    mask = mask[..., -q_len:, -k_len:][..., q_start:q_end, :]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask


def token_keys(call: AttentionCall) -> torch.Tensor:
    """Bool (B, K) for a call with no cached keys (a prefill: query i is key i's token): key j is a token, not
    padding, if its own query sees it and does not see key j + 1. A padding query's own key is masked, or, where a
    backend "unmasked" a padding row to avoid NaNs, it sees the next key too. Two diagonals of the mask: no pass
    over its (queries x keys)."""
    batch, k_len = call.query.shape[0], call.key.shape[2]
    mask = call.attention_mask
    if mask is None:
        return torch.ones(batch, k_len, dtype=torch.bool, device=call.key.device)
    square = mask[:, 0, -k_len:, -k_len:]
    own, after = square.diagonal(0, -2, -1), square.diagonal(1, -2, -1)
    if mask.dtype != torch.bool:
        floor = torch.finfo(mask.dtype).min / 2
        own, after = own > floor, after > floor
    tokens = own.clone()
    tokens[:, :-1] &= ~after
    return tokens.expand(batch, -1)  # a mask broadcast over the batch has one row


class _CausalMasks:
    """The causal masks of one forward pass's chunks, each built once and shared by every layer: read-only, like
    every mask an approximation gets. A prefill's layers ask for the same chunks in the same order, which a
    least-recently-used cache smaller than the set would miss every time; so masks are kept as they come, up to
    `budget_bytes`, and all are dropped when a call with another number of keys (the next forward) asks."""

    def __init__(self, budget_bytes: int = 32 * 2**20) -> None:
        self.budget_bytes = budget_bytes
        self._k_len = -1
        self._masks: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self._bytes = 0

    def __call__(self, first: int, size: int, k_len: int, device: torch.device) -> torch.Tensor:
        """Bool (1, 1, size, k_len): query i sees keys 0..first + i."""
        if k_len != self._k_len:
            self._k_len, self._masks, self._bytes = k_len, {}, 0
        key = (first, size, device)
        mask = self._masks.get(key)
        if mask is None:
            rows = torch.arange(first, first + size, device=device)[:, None]
            mask = (torch.arange(k_len, device=device)[None, :] <= rows)[None, None]
            if self._bytes + mask.numel() <= self.budget_bytes:
                self._masks[key] = mask
                self._bytes += mask.numel()
        return mask


_causal_mask = _CausalMasks()


SCORE_WIDTH_ALIGN = 16


def aligned_chunks(q_len: int, first_query_key: int, chunk: int) -> list[tuple[int, int]]:
    """Query chunks (start, end) of at most `chunk` rows covering 0..q_len, for a call whose query i is key
    `first_query_key + i`. A causal chunk's scores stop at its last query's key, so their width is
    first_query_key + end; MKL's matmul runs about half as fast when that width is not a multiple of 16 (measured:
    9.4 ms against 4.3 ms for 681 rows by 2043 or 2048 keys), so every chunk but the last ends where it is one: a
    chunk of at least 16 rows gives up fewer than 16 of them for that."""
    bounds = []
    start = 0
    while start < q_len:
        end = min(q_len, start + chunk)
        if chunk >= SCORE_WIDTH_ALIGN and end < q_len:
            end -= (first_query_key + end) % SCORE_WIDTH_ALIGN
        bounds.append((start, end))
        start = end
    return bounds


def real_queries(visible: torch.Tensor, q_start: int, q_len: int) -> torch.Tensor:
    """Bool (B, 1 or Hq, C): queries that are real tokens, not padding.

    A real query sees its own key and nothing after it. A padding query's own key is masked; a padding row that a
    backend "unmasked" to avoid NaNs sees future keys. Either way it is not counted.
    """
    chunk, k_len = visible.shape[-2], visible.shape[-1]
    own = torch.arange(q_start, q_start + chunk, device=visible.device) + (k_len - q_len)
    sees_self = visible.gather(-1, own.view(1, 1, -1, 1).expand(*visible.shape[:2], -1, 1)).squeeze(-1)
    future = torch.arange(k_len, device=visible.device)[None, :] > own[:, None]
    sees_future = (visible & future).any(-1)
    return sees_self & ~sees_future


class RetrievalScoreProbe:
    """Records, for the last query of every attention call, each head's top-1 key.

    The key is stored as its distance from the newest key (0 = the query's own position), which stays right for
    sliding-window caches that keep only the most recent keys. Only the last query is looked at, so the prefill can
    run with this probe off at full backend speed and the decode steps cost one (1 x K) score row per head.

    `keep_rows=True` also keeps that row's softmax (the attention weights), for the scores that weigh attention mass
    (HeadKV's and the distant-mass split): `take_rows` hands them over after each step.
    """

    def __init__(self, num_layers: int, num_heads: int, keep_rows: bool = False) -> None:
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.keep_rows = keep_rows
        self.step_top1: list[torch.Tensor | None] = [None] * num_layers
        self.step_rows: list[torch.Tensor | None] = [None] * num_layers

    def before(self, call: AttentionCall) -> None:
        return None

    def after(self, call: AttentionCall, output: torch.Tensor) -> None:
        q_len = call.query.shape[2]
        # With no mask the last query sees every key: no visibility tensor to build at each decode step.
        visible = None if call.attention_mask is None else visible_mask(call, q_len - 1, q_len)
        logits = masked_logits(call.query[:, :, -1:], call.key, visible, call.scaling)
        top1 = logits[0, :, 0, :].argmax(dim=-1)  # (Hq,), batch 1 during detection
        self.step_top1[call.layer] = (call.key.shape[2] - 1) - top1
        if self.keep_rows:
            self._keep_row(call, logits[0, :, 0, :])
        return None

    def _keep_row(self, call: AttentionCall, logits: torch.Tensor) -> None:
        """The last query's attention weights (Hq, K), soft-capped as the model caps them (the top-1 needs no cap:
        capping is monotonic)."""
        softcap = call.kwargs.get("softcap")
        if softcap:
            logits = torch.where(torch.isinf(logits), logits, torch.tanh(logits / softcap) * softcap)
        self.step_rows[call.layer] = logits.softmax(dim=-1)

    def take_step(self) -> torch.Tensor:
        """The (layers, heads) distances-from-end recorded by the forward pass that just ran, then reset."""
        missing = [i for i, t in enumerate(self.step_top1) if t is None]
        if missing:
            raise RuntimeError(f"attention layers {missing} were not observed during this step")
        result = torch.stack(self.step_top1)  # type: ignore[arg-type]
        self.step_top1 = [None] * self.num_layers
        return result

    def take_rows(self) -> torch.Tensor:
        """The (layers, heads, K) attention weights of the step that just ran (`keep_rows=True`), then reset.

        Columns are aligned on the newest key (the last column is the query's own); a layer that sees fewer keys (a
        sliding window) has zeros in the columns of the keys it no longer holds."""
        rows, self.step_rows = self.step_rows, [None] * self.num_layers
        if any(r is None for r in rows):
            raise RuntimeError("take_rows needs keep_rows=True and one observed forward pass")
        width = max(r.shape[-1] for r in rows)  # type: ignore[union-attr]
        if all(r.shape[-1] == width for r in rows):  # type: ignore[union-attr]
            return torch.stack(rows)  # type: ignore[arg-type]
        padded = rows[0].new_zeros(self.num_layers, self.num_heads, width)  # type: ignore[union-attr]
        for layer, row in enumerate(rows):
            padded[layer, :, width - row.shape[-1]:] = row  # type: ignore[union-attr]
        return padded


class QuestionRowsProbe:
    """The attention that the queries from absolute position `first_row` on give a span of keys, per (layer, head).

    For QRHead's query-focused score: only the question's rows are scored (in the prefill, from the question on; the
    null question's call; the first decode step, whose query is the prompt's last token), against every key they see
    and in bounded chunks: never a call's whole attention matrix. `first_position` is the absolute position of the
    next call's first query; sums go to `target` ("question", or "null" for QRHead's calibration query).
    """

    TARGETS = ("question", "null")

    def __init__(self, num_layers: int, keys: tuple[int, int], chunk_elements: int = 2**23) -> None:
        self.num_layers = num_layers
        self.keys = keys
        self.chunk_elements = chunk_elements
        self.first_position = 0
        self.first_row = 0
        self.target = "question"
        self.sums: dict[str, list[torch.Tensor | None]] = {t: [None] * num_layers for t in self.TARGETS}
        self.rows: dict[str, list[int]] = {t: [0] * num_layers for t in self.TARGETS}

    def before(self, call: AttentionCall) -> None:
        return None

    @torch.no_grad()
    def after(self, call: AttentionCall, output: torch.Tensor) -> None:
        q_heads, q_len = call.query.shape[1], call.query.shape[2]
        k_len = call.key.shape[2]
        offset = self.keys[0] - (self.first_position + q_len - k_len)  # the span's first key, as a column of this call
        width = self.keys[1] - self.keys[0]
        lo, hi = max(offset, 0), min(offset + width, k_len)  # the span's keys this call still holds
        first = min(max(self.first_row - self.first_position, 0), q_len)  # the first row to score
        total = torch.zeros(q_heads, width, dtype=torch.float64, device=call.query.device)
        chunk = max(1, self.chunk_elements // max(1, q_heads * k_len))
        for start in range(first, q_len if hi > lo else first, chunk):
            end = min(q_len, start + chunk)
            logits = masked_logits(
                call.query[:, :, start:end], call.key, visible_mask(call, start, end), call.scaling,
                call.kwargs.get("softcap"),
            )
            weights = logits[0].softmax(dim=-1)  # (Hq, C, K), batch 1 during detection
            total[:, lo - offset:hi - offset] += weights[:, :, lo:hi].sum(dim=1).double()
        sums = self.sums[self.target]
        sums[call.layer] = total if sums[call.layer] is None else sums[call.layer] + total
        self.rows[self.target][call.layer] += q_len - first
        return None

    def mean(self, target: str) -> torch.Tensor:
        """(layers, heads, span) mean attention of `target`'s rows on each key of the span."""
        missing = [i for i, n in enumerate(self.rows[target]) if n == 0]
        if missing:
            raise RuntimeError(f"no {target} rows were observed in attention layers {missing}")
        return torch.stack([s / n for s, n in zip(self.sums[target], self.rows[target])])  # type: ignore[operator]


class ApproxStats:
    """Sums and counts per (layer, head): what N processes can add up exactly (no averages of averages)."""

    # attended / scanned: the approximation's cost as fractions of each query's visible keys (see approx/contract.py).
    FIELDS = ("recall", "error_norm", "exact_topk_mass", "approx_topk_mass", "attended", "scanned")

    def __init__(self, num_layers: int, num_heads: int) -> None:
        self.queries = torch.zeros(num_layers, num_heads, dtype=torch.float64)
        self.sums = {name: torch.zeros(num_layers, num_heads, dtype=torch.float64) for name in self.FIELDS}
        self.curve_sum = torch.zeros(num_layers, len(MASS_CURVE_K), dtype=torch.float64)
        self.curve_count = torch.zeros(num_layers, dtype=torch.float64)

    def means(self, name: str) -> torch.Tensor:
        """(layers, heads) averages over counted queries; NaN where nothing was counted."""
        return self.sums[name] / self.queries.where(self.queries > 0, torch.nan)

    def curve(self) -> torch.Tensor:
        return self.curve_sum / self.curve_count.where(self.curve_count > 0, torch.nan)[:, None]

    @classmethod
    def total(cls, parts: list["ApproxStats"]) -> "ApproxStats":
        """The statistics of all processes together: sums and counts add, in rank order."""
        combined = cls(*parts[0].queries.shape)
        for part in parts:
            combined.queries += part.queries.cpu()
            for name in cls.FIELDS:
                combined.sums[name] += part.sums[name].cpu()
            combined.curve_sum += part.curve_sum.cpu()
            combined.curve_count += part.curve_count.cpu()
        return combined


class ApproxProbe:
    """Compares each attention call's exact attention with the module's `_approx_attn`, query chunk by chunk.

    Per head and counted query (a real token with at least `min_visible_keys` visible keys): Recall@k of the
    approximation's ids against the exact top-k, the relative error of its output, and the exact-softmax mass held by
    each id set. Chunks bound memory to `chunk_elements` scores at a time: no full L x L matrix is ever built.
    With `layerwise=False` the approximate output replaces the layer's output, so errors propagate.

    Where the time goes. The analysis needs every query's scores against every key it sees (for the exact top-k)
    and the softmax log-normaliser (for the masses). Scoring the keys is unavoidable; the normaliser is not: where
    the hook allows it (`attend`: float32 on a CPU over sdpa) the probe runs sdpa's own CPU kernel, which returns the
    normaliser beside the very output sdpa would return, instead of letting the backend run and summing exponentials
    of every score again (elsewhere it does that). A causal chunk's scores stop at its own last key, which halves the
    work of a prefill; the exact top-k is taken blockwise (`topk.row_topk`); sums stay on the device until they are
    read, so a decode step costs no host copy.
    """

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        topk: int | str | Budget,
        layerwise: bool = True,
        min_visible_keys: int | None = None,
        chunk_elements: int = 2**23,
        approx_name: str = "approx",
        curve_stride: int = 256,
    ) -> None:
        self.budget = parse_budget(topk)
        self.layerwise = layerwise
        self.min_visible_keys = self.budget.default_min_visible_keys() if min_visible_keys is None else min_visible_keys
        self._min_keys_follow_k = min_visible_keys is None
        self.chunk_elements = chunk_elements
        self.approx_name = approx_name
        self.curve_stride = curve_stride
        self._stats = ApproxStats(num_layers, num_heads)
        # (layers, 1 + fields, heads) sums and (layers, 1 + curve points) curve sums, on the device of the calls.
        self._device_sums: torch.Tensor | None = None
        self._device_curve: torch.Tensor | None = None
        self._range_checked: set[int] = set()
        self._scores: torch.Tensor | None = None  # one flat buffer every chunk's scores are written into
        self._exact_heads: dict[int, list[int]] = {}  # layer -> heads kept on exact attention (hybrid runs)
        self._attended: tuple[AttentionCall, torch.Tensor | None] | None = None

    def set_exact_heads(self, heads: list[tuple[int, int]]) -> None:
        """Keep these (layer, head) on exact attention and approximate the others (DuoAttention / RazorAttention's
        hybrid). Such a head passes its exact output on and counts as recall 1, error 0, approximate mass 1 and
        attended = scanned = every visible key: what it costs to keep it exact."""
        self._exact_heads = {}
        for layer, head in heads:
            self._exact_heads.setdefault(int(layer), []).append(int(head))

    @property
    def topk(self) -> int | str:
        """The budget as the results JSON holds it: a number of keys, or a share such as "5%"."""
        return self.budget.json_value()

    def reset(self, topk: int | str | Budget | None = None) -> None:
        """Start counting afresh (another method or budget on the same loaded model), optionally with another
        budget; a `min_visible_keys` left at its default (10 k) follows the budget, one that was given stays."""
        if topk is not None:
            self.budget = parse_budget(topk)
            if self._min_keys_follow_k:
                self.min_visible_keys = self.budget.default_min_visible_keys()
        layers, heads = self._stats.queries.shape
        self._stats = ApproxStats(layers, heads)
        self._device_sums = self._device_curve = None
        self._range_checked.clear()
        self._attended = None

    @property
    def stats(self) -> ApproxStats:
        """The statistics so far (device sums moved into the host `ApproxStats` first)."""
        if self._device_sums is not None:
            sums = self._device_sums.cpu().double()
            self._stats.queries += sums[:, 0]
            for i, name in enumerate(ApproxStats.FIELDS, start=1):
                self._stats.sums[name] += sums[:, i]
            curve = self._device_curve.cpu().double()
            self._stats.curve_count += curve[:, 0]
            self._stats.curve_sum += curve[:, 1:]
            self._device_sums = self._device_curve = None
        return self._stats

    def before(self, call: AttentionCall) -> None:
        return None

    @torch.no_grad()
    def attend(self, call: AttentionCall) -> torch.Tensor | None:
        """The layer's exact output (B, Q, Hq, D) from the backend's own CPU kernel, which also returns the softmax
        log-normaliser the analysis needs (see the class); None where that kernel does not apply."""
        computed = cpu_attention_with_lse(call)
        if computed is None:
            return None
        output, lse = computed
        self._attended = (call, self._analyse(call, output, lse))
        return output.transpose(1, 2).contiguous()

    @torch.no_grad()
    def after(self, call: AttentionCall, output: torch.Tensor) -> torch.Tensor | None:
        attended, self._attended = self._attended, None
        if attended is not None and attended[0] is call:
            approx = attended[1]
        else:
            approx = self._analyse(call, output.transpose(1, 2), None)
        return None if approx is None else approx.to(output.dtype).reshape(output.shape)

    def _analyse(self, call: AttentionCall, output: torch.Tensor, lse: torch.Tensor | None) -> torch.Tensor | None:
        """Analyse every query chunk against the exact `output` (B, Hq, Q, D) and, where known, its softmax
        log-normaliser `lse` (B, Hq, Q); returns the approximate output (B, Q, Hq, D) if it is passed on."""
        batch, q_heads, q_len, _ = call.query.shape
        k_len = call.key.shape[2]
        if k_len == q_len:  # no cached keys: a new sequence, so a stateful approximation starts afresh
            reset_state(call.module, token_keys(call))
        if self._device_sums is None:
            layers, heads = self._stats.queries.shape
            dtype = torch.float64 if call.query.device.type != "mps" else torch.float32
            device = call.query.device
            self._device_sums = torch.zeros(layers, 1 + len(ApproxStats.FIELDS), heads, dtype=dtype, device=device)
            self._device_curve = torch.zeros(layers, 1 + len(MASS_CURVE_K), dtype=dtype, device=device)
        # Keys once per call, transposed and contiguous for the matmul of every chunk (a model's keys are often a
        # strided view, which each matmul would otherwise copy again). A decode step's single matmul reads the cache
        # in place instead: copying every key at every step would cost more than the step's own scoring.
        key, value = call.key.contiguous(), call.value.contiguous()
        key_t = key.float().transpose(-1, -2)
        if q_len > 1:
            key_t = key_t.contiguous()
        chunk = max(1, self.chunk_elements // max(1, batch * q_heads * k_len))
        needed = batch * q_heads * k_len * min(chunk, q_len)
        if self._scores is None or self._scores.numel() < needed or self._scores.device != call.query.device:
            self._scores = torch.empty(needed, dtype=torch.float32, device=call.query.device)
        approx_chunks = []
        for chunk_start, chunk_end in aligned_chunks(q_len, k_len - q_len, chunk):
            for start, end, k in self._budget_runs(call, chunk_start, chunk_end):
                chunk_lse = None if lse is None else lse[:, :, start:end]
                approx_chunks.append(self._analyse_chunk(call, output, chunk_lse, key, key_t, value, start, end, k))
        if self.layerwise:
            return None
        return torch.cat(approx_chunks, dim=2).transpose(1, 2)

    def _budget_runs(self, call: AttentionCall, start: int, end: int) -> list[tuple[int, int, int]]:
        """Queries start..end split into runs that share one k: the whole range for a budget in keys; for a share
        of the visible keys, each run's queries see numbers of keys that give the same k."""
        q_len, k_len = call.query.shape[2], call.key.shape[2]
        if not self.budget.is_share:
            return [(start, end, self.budget.tokens)]
        if call.attention_mask is None:
            visible = list(range(k_len - q_len + start + 1, k_len - q_len + end + 1))
        else:
            mask = visible_mask(call, start, end)
            real = real_queries(mask, start, q_len).expand(mask.shape[:3])
            counts = mask.sum(-1)
            most = torch.where(real, counts, -1).amax(dim=(0, 1))
            least = torch.where(real, counts, k_len + 1).amin(dim=(0, 1))
            if bool(((most >= 0) & (most != least)).any()):
                raise UserInputError(
                    f"topk={self.budget} sets each query's budget from the keys it sees, and the sequences of one "
                    "batch see different numbers of keys at the same position: run with batch_size=1"
                )
            visible = most.clamp(min=1).tolist()
        runs: list[tuple[int, int, int]] = []
        for offset, count in enumerate(visible):
            k = self.budget.keys(count)
            if runs and runs[-1][2] == k:
                runs[-1] = (runs[-1][0], start + offset + 1, k)
            else:
                runs.append((start + offset, start + offset + 1, k))
        return runs

    def _analyse_chunk(
        self,
        call: AttentionCall,
        output: torch.Tensor,
        lse: torch.Tensor | None,
        key: torch.Tensor,
        key_t: torch.Tensor,
        value: torch.Tensor,
        start: int,
        end: int,
        budget: int,
    ) -> torch.Tensor:
        """Adds queries start..end, each with `budget` keys, to the sums; returns their output to pass on
        (B, Hq, C, D) float32.

        `key_t` is `key` transposed (B, Hkv, D, K) float32; the chunk's scores live in the probe's buffer until the
        next chunk."""
        query = call.query[:, :, start:end]
        size = end - start
        q_len, k_len = call.query.shape[2], call.key.shape[2]
        # No real query sees a key after its own position: the chunk's keys end at its last query.
        limit = k_len - q_len + end
        k = min(budget, limit)
        softcap = call.kwargs.get("softcap")
        min_keys = max(self.min_visible_keys, 1)
        exact_out = output[:, :, start:end].float()
        if call.attention_mask is None:
            # Plain causal attention, every query a real token: only the chunk's own block has future keys, and
            # query i of the chunk sees first_own + i + 1 keys. A decode step (one query) needs no tensor for that.
            first_own = limit - size
            if size == 1:
                counted, denominator, visible_count = limit >= min_keys, k, limit
            else:
                visible_count = torch.arange(first_own + 1, limit + 1, device=query.device)
                counted = visible_count >= min_keys
                denominator = visible_count.clamp(max=k)
            if counted is False:
                return exact_out  # nothing to count (too few keys); the exact output stands
            logits = self._chunk_logits(query, key_t, limit, call.scaling, softcap)
            # The chunk's own block holds each query's future keys. They are set to -inf only where something reads
            # them (`future_masked`): the CPU top-k stops at each row's own key, and masking a block of size x size
            # per head cost about as much as the top-k itself.
            future = first_own if size > 1 else None
            real = attend = None
        else:
            visible = visible_mask(call, start, end)
            real = real_queries(visible, start, q_len)
            attend = visible & real[..., None]
            visible_count = attend.sum(-1)
            counted = (visible_count >= min_keys) & real
            denominator = visible_count.clamp(max=k).clamp(min=1)
            logits = self._chunk_logits(query, key_t, limit, call.scaling, softcap)
            logits.masked_fill_(~attend[..., :limit], NEG_INF)
            future = None

        def future_masked() -> torch.Tensor:
            nonlocal future
            if future is not None:
                mask_future(logits, future)
                future = None
            return logits

        if lse is None:
            lse = torch.logsumexp(future_masked(), dim=-1)  # -inf on a row that sees nothing, never counted
        lse = lse.unsqueeze(-1)
        keys_seen = visible_count if isinstance(visible_count, int) else visible_count.clamp(min=1)

        approx_fn = getattr(call.module._approx_attn, "__func__", None)
        if counted is True and approx_fn is exact_topk and not self._exact_heads.get(call.layer):
            # A decode step of the default method, whole, in one kernel where it applies (see topk.exact_step).
            stepped = exact_step(logits, k, value, exact_out, lse, self._device_sums[call.layer], k / limit)
            if stepped is not None:
                self._add_mass_curve(call.layer, logits, lse, counted, k_len - q_len + start)
                return stepped
        if approx_fn is exact_topk:  # the default: its ids are the exact ids, no need to score every key twice
            exact_scores, exact_ids = row_topk(logits, k, causal_first=future)  # masks them itself off the CPU kernel
            exact_ok = exact_scores > NEG_INF  # fewer than k visible keys: the rest are placeholders
            approx_out, error, exact_mass = attend_topk(exact_scores, exact_ids, value, exact_out, lse.squeeze(-1))
            recall = exact_ok.sum(-1) / denominator
            approx_mass = exact_mass
            attended = denominator / keys_seen
            scanned = 1.0  # every visible key scored with its full vector
        else:
            if attend is None:
                attend = visible_mask(call, start, end)
            take_scanned(call.module)  # nothing left over from a call that was not analysed
            causal_first = first_own if call.attention_mask is None else None
            with sharing_chunk_logits(call.module, query, attend, future_masked, logits, causal_first):
                approx_out, _, approx_ids = call.module._approx_attn(query, key, value, attend, call.scaling, k)
            reported = take_scanned(call.module)
            self._check_approx(call.layer, query, call.value, approx_out, approx_ids, k_len, k)
            approx_out = approx_out.float()
            if counted is True and not self._exact_heads.get(call.layer):
                # A decode step measured whole in one kernel where it applies (see set_metrics.id_set_step).
                sums = self._device_sums[call.layer]
                if id_set_step(logits, k, lse, approx_ids, approx_out, exact_out, reported, limit, sums):
                    self._add_mass_curve(call.layer, logits, lse, counted, k_len - q_len + start)
                    return approx_out
            exact_scores, exact_ids = row_topk(logits, k, causal_first=future)  # masks them itself off the CPU kernel
            causal = call.attention_mask is None  # query i of the chunk sees keys up to first_own + i
            hits, approx_mass, used, error, exact_mass = id_set_metrics(
                logits, lse, exact_scores, exact_ids, approx_ids, approx_out, exact_out,
                first_own if causal else None, None if causal else attend,
            )  # fmt: skip
            recall = hits / denominator
            attended = used / keys_seen
            scanned = NAN if reported is None else torch.as_tensor(reported, device=error.device) / keys_seen
        costs = [
            torch.as_tensor(c, dtype=error.dtype, device=error.device).expand_as(error) for c in (attended, scanned)
        ]
        values = torch.stack([recall.to(error.dtype).expand_as(error), error, exact_mass, approx_mass, *costs])
        exact_heads = self._exact_heads.get(call.layer)
        if exact_heads:  # kept exact: recall 1, error 0, all the mass, every visible key attended and scanned
            for field, value in zip((0, 1, 3, 4, 5), (1.0, 0.0, 1.0, 1.0, 1.0)):
                values[field][:, exact_heads] = value
            approx_out = approx_out.clone()
            approx_out[:, exact_heads] = exact_out[:, exact_heads]
        sums = self._device_sums[call.layer]
        if counted is True:  # a decode step with enough keys: every head counts once
            sums[0] += size * query.shape[0]
            sums[1:] += values.sum(dim=(1, 3))
        else:
            counted = counted.expand_as(error)
            sums[0] += counted.sum(dim=(0, 2))
            # where(), not a product with the count mask: a padding row's output may be NaN.
            sums[1:] += torch.where(counted, values, 0.0).sum(dim=(1, 3))
        self._add_mass_curve(call.layer, logits, lse, counted, k_len - q_len + start, future)
        if real is not None:
            approx_out = torch.where(real[..., None], approx_out, exact_out)
        return approx_out

    def _chunk_logits(
        self, query: torch.Tensor, key_t: torch.Tensor, limit: int, scaling: float, softcap: float | None
    ) -> torch.Tensor:
        """The chunk's scores against keys 0..limit-1, in the probe's buffer (soft-capped where the model does)."""
        logits = scores_against(query, key_t[..., :limit], scaling, out=self._scores)
        return soft_capped(logits, softcap)

    def _add_mass_curve(
        self,
        layer: int,
        logits: torch.Tensor,
        lse: torch.Tensor,
        counted: torch.Tensor | bool,
        first_position: int,
        future: int | None = None,
    ) -> None:
        """Mass held by the top 1, 2, 4 ... 1024 keys, on queries at every `curve_stride`-th position (sorting is the
        costly part, so it is sampled by absolute position: a decode step is sampled as its prefill row would be).
        `future`: the chunk's future keys are not masked yet, and row i sees keys up to future + i."""
        size = logits.shape[2]
        offset = (-first_position) % self.curve_stride
        if offset >= size:
            return
        rows = slice(offset, size, self.curve_stride)
        width = logits.shape[-1]
        sampled = logits[:, :, rows]
        if future is not None:
            own = torch.arange(offset, size, self.curve_stride, device=logits.device) + future
            later = torch.arange(width, device=logits.device)[None, :] > own[:, None]
            sampled = sampled.masked_fill(later, NEG_INF)
        top = sampled.topk(min(MASS_CURVE_K[-1], width), dim=-1).values
        top = (top - lse[:, :, rows]).exp_().cumsum(-1)
        curve = top[..., [min(p, width) - 1 for p in MASS_CURVE_K]]
        if counted is True:
            self._device_curve[layer, 0] += curve.shape[0] * curve.shape[1] * curve.shape[2]
            self._device_curve[layer, 1:] += curve.sum(dim=(0, 1, 2))
            return
        sample = counted.expand(*logits.shape[:3])[:, :, rows]
        self._device_curve[layer, 0] += sample.sum()
        self._device_curve[layer, 1:] += torch.where(sample[..., None], curve, 0.0).sum(dim=(0, 1, 2))

    def _check_approx(
        self, layer: int, query: torch.Tensor, value: torch.Tensor, approx_out: torch.Tensor, ids: torch.Tensor,
        k_len: int, k: int,
    ) -> None:
        """Shapes on every call (free); the id range once per layer, since reading it back is a device sync."""
        expected = (*query.shape[:3], value.shape[-1])
        if tuple(approx_out.shape) != expected:
            raise UserInputError(
                f"approx function {self.approx_name} returned approx_output of shape {tuple(approx_out.shape)}; "
                f"expected (B, Hq, Q, D) = {expected}"
            )
        if ids.dim() != 4 or tuple(ids.shape[:3]) != expected[:3] or ids.dtype not in (torch.int64, torch.int32):
            raise UserInputError(
                f"approx function {self.approx_name} returned topk_ids of shape {tuple(ids.shape)} ({ids.dtype}); "
                f"expected integer ids of shape (B, Hq, Q, k) = {(*expected[:3], k)}"
            )
        if layer in self._range_checked:
            return
        self._range_checked.add(layer)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k_len):
            raise UserInputError(
                f"approx function {self.approx_name} returned key ids outside 0..{k_len - 1}; ids index the keys"
            )


def nan_to_none(values: torch.Tensor) -> list:
    """Tensor -> nested lists with NaN as None, for JSON."""
    return [nan_to_none(v) for v in values] if values.dim() else (None if math.isnan(float(values)) else float(values))


class HeadMask:
    """Switches heads off on every forward pass, prefill and decode alike, with any base backend.

    `uniform` zeroes the head's query, so all its logits are 0 and its attention is uniform over the visible keys
    (the original's method); `zero` zeroes the head's output. Layers with no masked head return at once.
    """

    MODES = ("uniform", "zero")

    def __init__(self, heads: dict[int, list[int]], mode: str = "uniform") -> None:
        if mode not in self.MODES:
            raise UserInputError(f"unknown mask_mode={mode!r}; use uniform or zero")
        self.mode = mode
        self.heads = {layer: torch.tensor(sorted(set(h)), dtype=torch.long) for layer, h in heads.items() if h}

    def before(self, call: AttentionCall) -> torch.Tensor | None:
        heads = self.heads.get(call.layer)
        if heads is None or self.mode != "uniform":
            return None
        query = call.query.clone()
        query[:, heads.to(query.device)] = 0
        return query

    def after(self, call: AttentionCall, output: torch.Tensor) -> torch.Tensor | None:
        heads = self.heads.get(call.layer)
        if heads is None or self.mode != "zero":
            return None
        output = output.clone()  # (B, Q, Hq, D)
        output[:, :, heads.to(output.device)] = 0
        return output
