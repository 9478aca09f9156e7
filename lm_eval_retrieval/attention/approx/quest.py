"""`quest`: query-aware page selection by an upper bound on each page's scores.

Paper: Jiaming Tang, Yilong Zhao, Kan Zhu, Guangxuan Xiao, Baris Kasikci, Song Han, "Quest: Query-Aware Sparsity
for Efficient Long-Context LLM Inference", 2024, arXiv:2406.10774.

Rule. The keys are cut into pages of `page_size` consecutive positions (key index 0 starts page 0). Each page is
summarised by the element-wise minimum m and maximum M of its keys; a query q bounds the scores of a page by
sum_d max(q_d m_d, q_d M_d) times the softmax scaling, which is >= q . k * scaling for every key k of the page. The
pages are read in decreasing order of that bound until they hold the budget: ceil(topk / page_size) pages when every
page is whole and visible, more only where a read page is partly masked (the newest page still filling up, a page cut
by left padding, causality or a sliding window), so that the pages read always hold at least min(topk, visible)
visible keys. Per query, a page's summary covers only the keys that query may see; a page it cannot see is never
read. The paper attends every key of the pages read (about topk keys); the contract returns at most topk ids, so the
output is exact attention (soft-capped where the model soft-caps) over the topk keys of the pages read with the
largest exact scores, and those are the ids returned. With page_size 1 the bound is the exact score and Quest is
exact top-k. (The paper also keeps its first two layers dense; here every layer is approximated alike.)

Cost model: scanned = 2 * visible_keys / page_size (the two summary products per page) + page_size * pages_read.

State: the summaries of whole pages are kept in `approx_state(module)` and extended as keys arrive, so a decode step
summarises only its newest page; the probe empties that state at the start of every sequence.

On a CPU the partly visible pages' bounds and each query's scoring of the keys in the pages it reads (and the
attention over its best k) are numba kernels (`_quest_scan.py`): only the read pages' keys are scored, as the rule
says. Elsewhere the same rule runs as tensor operations over every key's exact score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._numba import numba_module
from ..kernel_rows import mask_rows, match_torch_threads, row_groups, row_kernel
from .common import attend_over_ids, masked_logits, module_softcap, scores_against, shared_causal_first
from .contract import approx_args, approx_state, method, report_scanned

NEG_INF = float("-inf")
PARTIAL_BLOCK = 2**22  # elements per block when summarising partly visible pages per query


@method(page_size=16)
def quest(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float,
    topk: int,
) -> tuple[torch.Tensor, None, torch.Tensor]:
    size = max(1, int(approx_args(module, quest)["page_size"]))
    batch, q_heads, q_len, _ = query.shape
    k_len = key.shape[2]
    k = min(topk, k_len)
    visible = attention_mask.expand(batch, -1, q_len, k_len)
    first = shared_causal_first(module, query)
    bounds, slots, counts = quest_page_bounds(module, query, key, visible, scaling, size, first)
    if first is None:
        visible_keys = _per_query_head(visible.sum(-1), q_heads)
    else:  # a plainly causal chunk: query i sees first + i + 1 keys
        visible_keys = torch.arange(first + 1, first + 1 + q_len, device=query.device).expand(batch, q_heads, -1)
    kernels = numba_module("approx._quest_scan") if query.device.type == "cpu" else None
    if kernels is not None:
        order, read = _pages_in_order(kernels, bounds, counts, k)
        report_scanned(module, 2.0 * visible_keys / size + float(size) * read.view(batch, q_heads, q_len))
        return _read_and_attend(kernels, query, key, value, visible, order, read, size, scaling, k, module)
    read, order = _pages_to_read(bounds, _per_query_head(counts, q_heads), k)
    report_scanned(module, 2.0 * visible_keys / size + float(size) * read.sum(-1))
    logits = masked_logits(query, key, visible, scaling, module_softcap(module))
    ids = _best_keys_in_pages(logits, order, read, size, k, visible, q_heads)
    return attend_over_ids(logits, ids, value), None, ids


def _pages_in_order(  # type: ignore[no-untyped-def]
    kernels, bounds: torch.Tensor, counts: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU path of `_pages_to_read`: each row's pages to read, best first, (R, P) int64 (the first read[r]
    entries of row r), and read (R,) int64. counts: visible keys per (mask row, page) (B, Hm, Q, P)."""
    batch, q_heads, q_len, pages = bounds.shape
    rows = batch * q_heads * q_len
    order, read = torch.empty(rows, pages, dtype=torch.int64), torch.empty(rows, dtype=torch.int64)
    match_torch_threads()
    kernels.pages_to_read(
        bounds.reshape(rows, pages).contiguous().numpy(), counts.reshape(-1, pages).contiguous().numpy(),
        mask_rows(batch, q_heads, q_len, counts.shape[1]), k, order.numpy(), read.numpy(),
    )  # fmt: skip
    return order, read


def _read_and_attend(  # type: ignore[no-untyped-def]
    kernels, query, key, value, visible, order, read, size: int, scaling: float, k: int, module
) -> tuple[torch.Tensor, None, torch.Tensor]:
    """The CPU path of the last steps: each row scores only the keys of the pages it reads (`_quest_scan.py`);
    order and read as `_pages_in_order` gives them."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    mask_heads, rows = visible.shape[1], batch * q_heads * q_len
    mask = visible.reshape(-1, k_len).contiguous()
    hidden = (~mask).to(torch.uint8).argmax(-1)  # each mask row's first invisible key (0 if none): placeholders
    ids, out = torch.empty(rows, k, dtype=torch.int64), torch.empty(rows, value.shape[-1])
    row_kernel(kernels, "quest_attend", rows)(
        query.float().reshape(rows, dim).contiguous().numpy(),
        key.float().contiguous().view(batch * kv_heads, k_len, dim).numpy(),
        value.float().contiguous().view(batch * kv_heads, k_len, -1).numpy(), row_groups(batch, q_heads, kv_heads, q_len),
        mask.numpy(), mask_rows(batch, q_heads, q_len, mask_heads), order.numpy(), read.numpy(), size, float(scaling),
        float(module_softcap(module) or 0.0), hidden.numpy(), ids.numpy(), out.numpy(),
    )  # fmt: skip
    shape = (batch, q_heads, q_len)
    return out.view(*shape, -1), None, ids.view(*shape, k)


def quest_page_bounds(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    visible: torch.Tensor,
    scaling: float,
    size: int,
    causal_first: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each query's bound on each page (B, Hq, Q, P), -inf for a page it sees nothing of; the visibility reshaped
    into pages (B, Hm, Q, P, size) (slots past the last key are False); and the visible keys per page (B, Hm, Q, P).

    Whole visible pages take the (cached) page summaries, two grouped matmuls: q+ . M + q- . m; a partly visible page
    is summarised again over the keys that query sees, so the bound is the tightest the rule allows.
    `causal_first`: where the chunk is plainly causal (query i sees keys 0 .. causal_first + i), the pages each
    query sees follow from that, without a pass over the mask."""
    batch, q_heads, q_len, _ = query.shape
    k_len = key.shape[2]
    pages = -(-k_len // size)
    pad = pages * size - k_len
    if pad:
        visible = torch.cat([visible, visible.new_zeros(*visible.shape[:3], pad)], dim=-1)
    slots = visible.reshape(*visible.shape[:3], pages, size)
    if causal_first is None:
        exists = torch.arange(pages * size, device=key.device).view(pages, size) < k_len
        counts = slots.sum(-1)
        seen_any = counts > 0
        seen_all = (slots | ~exists).all(-1)
    else:
        start = torch.arange(pages, device=key.device) * size
        whole = (k_len - start).clamp(max=size)  # the keys each page has (the last may be short)
        last = causal_first + torch.arange(q_len, device=key.device)  # each query's last visible key
        counts = torch.minimum((last[:, None] + 1 - start).clamp(min=0), whole).expand(*visible.shape[:2], -1, -1)
        seen_any, seen_all = counts > 0, counts == whole
    low, high = _page_summaries(module, key, size)
    q = query.float()
    bounds = scores_against(q.clamp(min=0), high.transpose(-1, -2), scaling)
    bounds += scores_against(q.clamp(max=0), low.transpose(-1, -2), scaling)
    bounds.masked_fill_(~_per_query_head(seen_any, q_heads), NEG_INF)
    partial = _per_query_head(seen_any & ~seen_all, q_heads)
    if bool(partial.any()):
        where = partial.nonzero()
        bounds[tuple(where.unbind(1))] = _partial_bounds(query, key, slots, where, scaling, size)
    return bounds, slots, counts


def _page_summaries(module: torch.nn.Module, key: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise min and max of each page's keys (B, Hkv, P, D); the last page covers only the keys it has.

    Whole pages are kept in the module's per-sequence state and only the pages completed since the last call are
    summarised; the trailing, still-filling page is summarised afresh every call."""
    batch, kv_heads, k_len, dim = key.shape
    whole = k_len // size
    state = approx_state(module)
    cached = state.get("quest_pages")
    stamp = (size, batch, kv_heads, dim, key.device)
    if cached is None or cached[0] != stamp or cached[1].shape[2] > whole:
        empty = torch.empty(batch, kv_heads, 0, dim, dtype=torch.float32, device=key.device)
        cached = (stamp, empty, empty)
    done = cached[1].shape[2]
    if done < whole:
        fresh = key[:, :, done * size : whole * size].float().reshape(batch, kv_heads, whole - done, size, dim)
        cached = (stamp, torch.cat([cached[1], fresh.amin(3)], 2), torch.cat([cached[2], fresh.amax(3)], 2))
    state["quest_pages"] = cached
    low, high = cached[1], cached[2]
    if whole * size < k_len:
        tail = key[:, :, whole * size :].float()
        low = torch.cat([low, tail.amin(2, keepdim=True)], 2)
        high = torch.cat([high, tail.amax(2, keepdim=True)], 2)
    return low, high


def _partial_bounds(
    query: torch.Tensor, key: torch.Tensor, slots: torch.Tensor, where: torch.Tensor, scaling: float, size: int
) -> torch.Tensor:
    """Bounds of the partly visible (batch, query head, query, page) entries `where` (N, 4), each page summarised
    over the keys that query sees; in blocks so that memory stays bounded whatever the mask (on a CPU, one numba
    pass that reads each page's keys in place)."""
    batch, kv_heads, k_len, dim = key.shape
    group = query.shape[1] // kv_heads
    mask_heads = slots.shape[1]
    kernels = numba_module("approx._quest_scan") if query.device.type == "cpu" else None
    if kernels is not None:
        b, h, q, p = where.unbind(1)
        seen = slots[b, h if mask_heads > 1 else torch.zeros_like(h), q, p].contiguous()
        out = torch.empty(where.shape[0])
        match_torch_threads()
        kernels.partial_bounds(
            query[b, h, q].float().contiguous().numpy(), key.float().contiguous().view(-1, k_len, dim).numpy(),
            (b * kv_heads + h // group).numpy(), p.contiguous().numpy(), seen.numpy(), size, float(scaling), out.numpy(),
        )  # fmt: skip
        return out
    pages = slots.shape[3]
    paged = F.pad(key.float(), (0, 0, 0, pages * size - k_len)).view(batch, kv_heads, pages, size, dim)
    out = []
    step = max(1, PARTIAL_BLOCK // (size * dim))
    for start in range(0, where.shape[0], step):
        b, h, q, p = where[start : start + step].unbind(1)
        keys = paged[b, h // group, p]  # (n, size, D)
        seen = slots[b, h if mask_heads > 1 else torch.zeros_like(h), q, p].unsqueeze(-1)
        low = keys.masked_fill(~seen, float("inf")).amin(1)
        high = keys.masked_fill(~seen, NEG_INF).amax(1)
        vec = query[b, h, q].float()
        out.append(((vec.clamp(min=0) * high + vec.clamp(max=0) * low).sum(-1)) * scaling)
    return torch.cat(out)


def _pages_to_read(bounds: torch.Tensor, counts: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pages in decreasing bound (B, Hq, Q, P) and which of them are read (bool, same shape): a page is read while
    the pages before it hold fewer than k visible keys, and only if it has a visible key."""
    order = bounds.sort(dim=-1, descending=True).indices
    held = counts.gather(-1, order)
    before = held.cumsum(-1) - held
    return (before < k) & (held > 0), order


def _best_keys_in_pages(
    logits: torch.Tensor,
    order: torch.Tensor,
    read: torch.Tensor,
    size: int,
    k: int,
    visible: torch.Tensor,
    q_heads: int,
) -> torch.Tensor:
    """The k keys (B, Hq, Q, k) of the read pages with the largest exact scores; slots with no visible key left
    point at an invisible key (placeholder ids, no weight)."""
    k_len = logits.shape[-1]
    widest = max(1, int(read.sum(-1).max()))
    pages, taken = order[..., :widest], read[..., :widest]
    ids = (pages.unsqueeze(-1) * size + torch.arange(size, device=pages.device)).flatten(-2)
    ok = taken.repeat_interleave(size, dim=-1) & (ids < k_len)
    ids = ids.clamp(max=k_len - 1)
    scores = logits.gather(-1, ids).masked_fill_(~ok, NEG_INF)
    if scores.shape[-1] < k:  # fewer slots than k (tiny pages, few visible keys): pad with placeholders
        extra = k - scores.shape[-1]
        scores = F.pad(scores, (0, extra), value=NEG_INF)
        ids = F.pad(ids, (0, extra))
    best, where = scores.topk(k, dim=-1)
    chosen = ids.gather(-1, where)
    hidden = _per_query_head((~visible).to(torch.uint8).argmax(-1), q_heads)  # first invisible key (0 if none)
    return torch.where(best > NEG_INF, chosen, hidden.unsqueeze(-1))


def _per_query_head(tensor: torch.Tensor, q_heads: int) -> torch.Tensor:
    """A tensor with a mask-head dimension of 1 or Hq at dim 1, expanded to Hq query heads."""
    return tensor.expand(tensor.shape[0], q_heads, *tensor.shape[2:])
