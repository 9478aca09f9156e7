"""Probes: pure tensor code that looks at one attention call at a time. No model knowledge lives here."""

from __future__ import annotations

import math
import torch

from ..errors import UserInputError
from .approx.common import masked_logits, scores_against
from .approx.contract import reset_state, take_scanned
from .approx.exact_topk import exact_topk
from .hook import AttentionCall, cpu_attention_with_lse
from .set_metrics import id_set_metrics
from .topk import attend_topk, row_topk

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
        rows = torch.arange(q_start, q_end, device=call.key.device)[:, None] + (k_len - q_len)
        cols = torch.arange(k_len, device=call.key.device)[None, :]
        return (cols <= rows)[None, None]
    mask = mask[..., -q_len:, -k_len:][..., q_start:q_end, :]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask


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
    """

    def __init__(self, num_layers: int, num_heads: int) -> None:
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.step_top1: list[torch.Tensor | None] = [None] * num_layers

    def before(self, call: AttentionCall) -> None:
        return None

    def after(self, call: AttentionCall, output: torch.Tensor) -> None:
        q_len = call.query.shape[2]
        # With no mask the last query sees every key: no visibility tensor to build at each decode step.
        visible = None if call.attention_mask is None else visible_mask(call, q_len - 1, q_len)
        logits = masked_logits(call.query[:, :, -1:], call.key, visible, call.scaling)
        top1 = logits[0, :, 0, :].argmax(dim=-1)  # (Hq,), batch 1 during detection
        self.step_top1[call.layer] = (call.key.shape[2] - 1) - top1
        return None

    def take_step(self) -> torch.Tensor:
        """The (layers, heads) distances-from-end recorded by the forward pass that just ran, then reset."""
        missing = [i for i, t in enumerate(self.step_top1) if t is None]
        if missing:
            raise RuntimeError(f"attention layers {missing} were not observed during this step")
        result = torch.stack(self.step_top1)  # type: ignore[arg-type]
        self.step_top1 = [None] * self.num_layers
        return result


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
        topk: int,
        layerwise: bool = True,
        min_visible_keys: int | None = None,
        chunk_elements: int = 2**23,
        approx_name: str = "approx",
        curve_stride: int = 256,
    ) -> None:
        self.topk = topk
        self.layerwise = layerwise
        self.min_visible_keys = 10 * topk if min_visible_keys is None else min_visible_keys
        self._min_keys_follow_k = min_visible_keys is None
        self.chunk_elements = chunk_elements
        self.approx_name = approx_name
        self.curve_stride = curve_stride
        self._stats = ApproxStats(num_layers, num_heads)
        # (layers, 1 + fields, heads) sums and (layers, 1 + curve points) curve sums, on the device of the calls.
        self._device_sums: torch.Tensor | None = None
        self._device_curve: torch.Tensor | None = None
        self._future: dict[tuple[int, torch.device], torch.Tensor] = {}
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

    def reset(self, topk: int | None = None) -> None:
        """Start counting afresh (another method or budget on the same loaded model), optionally with another k;
        a `min_visible_keys` left at its default (10 k) follows k, one that was given stays."""
        if topk is not None:
            if self._min_keys_follow_k:
                self.min_visible_keys = 10 * topk
            self.topk = topk
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
            reset_state(call.module)
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
        for start in range(0, q_len, chunk):
            end = min(q_len, start + chunk)
            chunk_lse = None if lse is None else lse[:, :, start:end]
            approx_chunks.append(self._analyse_chunk(call, output, chunk_lse, key, key_t, value, start, end))
        if self.layerwise:
            return None
        return torch.cat(approx_chunks, dim=2).transpose(1, 2)

    def _future_mask(self, size: int, device: torch.device) -> torch.Tensor:
        """Bool (size, size), True above the diagonal: the keys after each query inside a causal chunk's own block."""
        key = (size, device)
        if key not in self._future:
            self._future[key] = torch.ones(size, size, dtype=torch.bool, device=device).triu(1)
        return self._future[key]

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
    ) -> torch.Tensor:
        """Adds queries start..end to the sums; returns their output to pass on (B, Hq, C, D) float32.

        `key_t` is `key` transposed (B, Hkv, D, K) float32; the chunk's scores live in the probe's buffer until the
        next chunk."""
        query = call.query[:, :, start:end]
        size = end - start
        q_len, k_len = call.query.shape[2], call.key.shape[2]
        # No real query sees a key after its own position: the chunk's keys end at its last query.
        limit = k_len - q_len + end
        k = min(self.topk, limit)
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
            if size > 1:
                logits[..., first_own:].masked_fill_(self._future_mask(size, logits.device), NEG_INF)
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
        if lse is None:
            lse = torch.logsumexp(logits, dim=-1)  # -inf on a row that sees nothing, never counted
        lse = lse.unsqueeze(-1)
        keys_seen = visible_count if isinstance(visible_count, int) else visible_count.clamp(min=1)

        exact_scores, exact_ids = row_topk(logits, k)
        exact_ok = exact_scores > NEG_INF  # fewer than k visible keys: the rest are placeholders
        approx_fn = getattr(call.module._approx_attn, "__func__", None)
        if approx_fn is exact_topk:  # the default: its ids are the exact ids, no need to score every key twice
            approx_out, error, exact_mass = attend_topk(exact_scores, exact_ids, value, exact_out, lse.squeeze(-1))
            recall = exact_ok.sum(-1) / denominator
            approx_mass = exact_mass
            attended = denominator / keys_seen
            scanned = 1.0  # every visible key scored with its full vector
        else:
            if attend is None:
                attend = visible_mask(call, start, end)
            take_scanned(call.module)  # nothing left over from a call that was not analysed
            approx_out, _, approx_ids = call.module._approx_attn(query, key, value, attend, call.scaling, k)
            reported = take_scanned(call.module)
            self._check_approx(call.layer, query, call.value, approx_out, approx_ids, k_len)
            approx_out = approx_out.float()
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
        if exact_heads:
            keep = torch.zeros(error.shape[1], dtype=torch.bool, device=error.device)
            keep[exact_heads] = True
            exact_values = torch.tensor([1.0, 0.0, NAN, 1.0, 1.0, 1.0], dtype=values.dtype, device=values.device)
            exact_values = torch.where(exact_values.isnan()[:, None, None, None], values, exact_values[:, None, None, None])
            values = torch.where(keep[None, None, :, None], exact_values, values)
            approx_out = torch.where(keep[None, :, None, None], exact_out, approx_out)
        sums = self._device_sums[call.layer]
        if counted is True:  # a decode step with enough keys: every head counts once
            sums[0] += size * query.shape[0]
            sums[1:] += values.sum(dim=(1, 3))
        else:
            counted = counted.expand_as(error)
            sums[0] += counted.sum(dim=(0, 2))
            # where(), not a product with the count mask: a padding row's output may be NaN.
            sums[1:] += torch.where(counted, values, 0.0).sum(dim=(1, 3))
        self._add_mass_curve(call.layer, logits, lse, counted, k_len - q_len + start)
        if real is not None:
            approx_out = torch.where(real[..., None], approx_out, exact_out)
        return approx_out

    def _chunk_logits(
        self, query: torch.Tensor, key_t: torch.Tensor, limit: int, scaling: float, softcap: float | None
    ) -> torch.Tensor:
        """The chunk's scores against keys 0..limit-1, in the probe's buffer (soft-capped where the model does)."""
        logits = scores_against(query, key_t[..., :limit], scaling, out=self._scores)
        return torch.tanh(logits / softcap).mul_(softcap) if softcap else logits

    def _add_mass_curve(
        self, layer: int, logits: torch.Tensor, lse: torch.Tensor, counted: torch.Tensor | bool, first_position: int
    ) -> None:
        """Mass held by the top 1, 2, 4 ... 1024 keys, on queries at every `curve_stride`-th position (sorting is the
        costly part, so it is sampled by absolute position: a decode step is sampled as its prefill row would be)."""
        size = logits.shape[2]
        offset = (-first_position) % self.curve_stride
        if offset >= size:
            return
        rows = slice(offset, size, self.curve_stride)
        width = logits.shape[-1]
        top = logits[:, :, rows].topk(min(MASS_CURVE_K[-1], width), dim=-1).values
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
        k_len: int,
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
                f"expected integer ids of shape (B, Hq, Q, k) = {(*expected[:3], self.topk)}"
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
