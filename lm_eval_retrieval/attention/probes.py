"""Probes: pure tensor code that looks at one attention call at a time. No model knowledge lives here."""

from __future__ import annotations

import math

import torch

from ..errors import UserInputError
from .approx.common import masked_logits, weighted_ids
from .approx.exact_topk import exact_topk
from .hook import AttentionCall

MASS_CURVE_K = [2**i for i in range(11)]  # 1 .. 1024


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
        logits = masked_logits(call.query[:, :, -1:], call.key, visible_mask(call, q_len - 1, q_len), call.scaling)
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

    FIELDS = ("recall", "error_norm", "exact_topk_mass", "approx_topk_mass")

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
    """

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        topk: int,
        layerwise: bool = True,
        min_visible_keys: int | None = None,
        chunk_elements: int = 2**22,
        approx_name: str = "approx",
        curve_stride: int = 16,
    ) -> None:
        self.topk = topk
        self.layerwise = layerwise
        self.min_visible_keys = 10 * topk if min_visible_keys is None else min_visible_keys
        self.chunk_elements = chunk_elements
        self.approx_name = approx_name
        self.curve_stride = curve_stride
        self.stats = ApproxStats(num_layers, num_heads)

    def before(self, call: AttentionCall) -> None:
        return None

    def after(self, call: AttentionCall, output: torch.Tensor) -> torch.Tensor | None:
        batch, q_heads, q_len, _ = call.query.shape
        k_len = call.key.shape[2]
        chunk = max(1, self.chunk_elements // max(1, batch * q_heads * k_len))
        approx_chunks = []
        for start in range(0, q_len, chunk):
            end = min(q_len, start + chunk)
            approx_chunks.append(self._analyse_chunk(call, output, start, end))
        if self.layerwise:
            return None
        approx = torch.cat(approx_chunks, dim=2).transpose(1, 2).to(output.dtype)  # (B, Q, Hq, D) like the backends
        return approx.reshape(output.shape)

    @torch.no_grad()
    def _analyse_chunk(self, call: AttentionCall, output: torch.Tensor, start: int, end: int) -> torch.Tensor:
        query = call.query[:, :, start:end]
        q_len, k_len = call.query.shape[2], call.key.shape[2]
        softcap = call.kwargs.get("softcap")
        if call.attention_mask is None:
            # Plain causal attention, every query a real token: mask only the keys after each query, in place.
            first_own = k_len - q_len + start  # key index of the chunk's first query
            logits = masked_logits(query, call.key, None, call.scaling, softcap)
            logits[..., first_own + (end - start) :] = float("-inf")
            future = torch.ones(end - start, end - start, dtype=torch.bool, device=logits.device).triu(1)
            logits[..., first_own : first_own + (end - start)].masked_fill_(future, float("-inf"))
            own = torch.arange(first_own, first_own + (end - start), device=logits.device)
            real = torch.ones(*query.shape[:3], dtype=torch.bool, device=logits.device)
            visible_count = (own + 1).expand(*query.shape[:3])
            attend = None
            probs = torch.softmax(logits, dim=-1)
        else:
            visible = visible_mask(call, start, end)
            real = real_queries(visible, start, q_len)
            attend = visible & real[..., None]
            visible_count = attend.sum(-1)
            logits = masked_logits(query, call.key, attend, call.scaling, softcap)
            probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # padding rows see nothing: all-zero, uncounted

        def is_visible(ids: torch.Tensor) -> torch.Tensor:
            if attend is None:
                return ids <= own[:, None]
            return attend.expand(*ids.shape[:3], -1).gather(-1, ids)

        # The backend already computed the exact output of this layer: the error norm is measured against it.
        exact_out = output.transpose(1, 2)[:, :, start:end].float()
        k = min(self.topk, k_len)
        exact_ids = logits.topk(k, dim=-1).indices
        exact_ok = is_visible(exact_ids)
        exact_weights = probs.gather(-1, exact_ids) * exact_ok

        approx_fn = getattr(call.module._approx_attn, "__func__", None)
        if approx_fn is exact_topk:  # the default: its ids are the exact ids, no need to score every key twice
            approx_ids, approx_ok = exact_ids, exact_ok
            normaliser = exact_weights.sum(-1, keepdim=True).clamp_min(1e-30)
            approx_out = weighted_ids(exact_weights / normaliser, exact_ids, call.value)
        else:
            if attend is None:
                attend = visible_mask(call, start, end)
            del logits
            approx_out, _, approx_ids = call.module._approx_attn(
                query, call.key, call.value, attend, call.scaling, self.topk
            )
            self._check_approx(query, call.value, approx_out, approx_ids, k_len)
            approx_ids, approx_out = approx_ids.long(), approx_out.float()
            approx_ok = _first_occurrence(approx_ids) & is_visible(approx_ids)

        counted = (real & (visible_count >= max(self.min_visible_keys, 1))).expand(*probs.shape[:3])
        hits = ((approx_ids[..., :, None] == exact_ids[..., None, :]) & exact_ok[..., None, :]).any(-1)
        denominator = visible_count.clamp(max=k).clamp(min=1).expand_as(counted)
        recall = (hits & approx_ok).sum(-1) / denominator
        error = (approx_out - exact_out).norm(dim=-1) / exact_out.norm(dim=-1).clamp_min(1e-30)
        exact_mass = exact_weights.sum(-1)
        approx_mass = (probs.gather(-1, approx_ids) * approx_ok).sum(-1)

        stats = self.stats
        layer = call.layer
        stats.queries[layer] += counted.sum(dim=(0, 2)).double().cpu()
        for name, values in zip(ApproxStats.FIELDS, (recall, error, exact_mass, approx_mass)):
            # where(), not a product with the count mask: a padding row's backend output may be NaN.
            stats.sums[name][layer] += torch.where(counted, values.double(), 0.0).sum(dim=(0, 2)).cpu()
        self._add_mass_curve(layer, probs, counted, start)
        return torch.where(real[..., None], approx_out, exact_out)

    def _add_mass_curve(self, layer: int, probs: torch.Tensor, counted: torch.Tensor, start: int) -> None:
        """Mass held by the top 1, 2, 4 ... 1024 keys, on every `curve_stride`-th query (sorting is the costly part)."""
        rows = torch.arange(start, start + probs.shape[2], device=probs.device) % self.curve_stride == 0
        sample = counted & rows
        if not sample.any():
            return
        k_len = probs.shape[-1]
        picked = probs[:, :, rows]
        top = picked.topk(min(MASS_CURVE_K[-1], k_len), dim=-1).values.cumsum(-1)
        points = torch.tensor([min(p, k_len) - 1 for p in MASS_CURVE_K], device=top.device)
        curve = top.index_select(-1, points).double()
        weight = sample[:, :, rows].double()
        self.stats.curve_sum[layer] += torch.where(weight[..., None] > 0, curve, 0.0).sum(dim=(0, 1, 2)).cpu()
        self.stats.curve_count[layer] += weight.sum().cpu()

    def _check_approx(
        self, query: torch.Tensor, value: torch.Tensor, approx_out: torch.Tensor, ids: torch.Tensor, k_len: int
    ) -> None:
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
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k_len):
            raise UserInputError(
                f"approx function {self.approx_name} returned key ids outside 0..{k_len - 1}; ids index the keys"
            )


def _first_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """Bool like `ids`: False where an id repeats an earlier one in its row, so duplicates count once."""
    earlier = torch.ones(ids.shape[-1], ids.shape[-1], dtype=torch.bool, device=ids.device).tril(-1)
    return ~((ids[..., :, None] == ids[..., None, :]) & earlier).any(-1)


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
