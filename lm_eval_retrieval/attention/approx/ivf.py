"""`ivf`: RetrievalAttention-style retrieval through an inverted-file (IVF) index, plus static sinks and recent keys.

Paper: Di Liu, Meng Chen, Baotong Lu, Huiqiang Jiang, Zhenhua Han, Qianxi Zhang, Qi Chen, Chengruidong Zhang, Bailu
Ding, Kai Zhang, Chen Chen, Fan Yang, Yuqing Yang, Lili Qiu, "RetrievalAttention: Accelerating Long-Context LLM
Inference via Vector Retrieval", 2024, arXiv:2409.10516. This is its IVF configuration (the paper's off-the-shelf ANN
baseline inside the same pipeline), not its attention-aware graph index.

Rule, per query. Its first `sinks` and last `window` visible keys are attended exactly (the paper's static pattern:
initial tokens and a recent window kept on the GPU). The rest of the budget, topk minus the static keys it sees, is
filled by vector search: each (batch row, KV head) has a faiss `IndexIVFFlat` over its keys with the inner-product
metric, `nlist` lists from k-means (faiss's default training, seed 1234), built when a sequence's first call arrives
(over every key of that call) and extended with each decode step's new keys, which join their nearest list without
retraining. The query is compared with the `nlist` centroids, the `nprobe` best lists are probed, their keys are scored
exactly by inner product, and the best of them are taken. Visibility: the index holds all keys of the sequence, so
the probed keys are filtered by the query's mask (and the static keys removed) *before* the best are taken; this is
faiss's search with k = every probed key followed by the mask, so a causal query never retrieves a future or padding
key and never loses a slot to one. Attention is then exact (soft-capped where the model does) over the chosen keys.

Budget and defaults. `sinks=-1` means min(4, topk // 4) and `window=-1` max(1, topk // 4) (the paper keeps 128 + 512
static tokens next to 100 retrieved ones at 128K context; at this project's small budgets a quarter each keeps at least
half the budget for retrieval: topk=10 -> 2 sinks, 2 recent, 6 retrieved). `nlist=-1` means round(sqrt(n)) lists for
n indexed keys; `nprobe=-1` means ceil(nlist / 10), about a tenth of the keys scanned (the paper reports 1-3% for its
own index and far more for IVF at equal accuracy). nprobe >= nlist searches every list: exact top-k outside the window.

Cost model (key-vector equivalents per query): nlist centroids + the visible non-static keys in the probed lists.

On a CPU each query's search and attention run as one numba pass (`_ivf_scan.py`) that scores only the keys of the
lists it probes; elsewhere the same rule runs as tensor operations over every key's exact score.
faiss-cpu is optional: the method asks for `pip install faiss-cpu` when it is called without it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ...errors import UserInputError
from .._numba import numba_module
from ..kernel_rows import mask_rows, row_groups, row_kernel
from .common import (
    holds_prefix,
    masked_logits,
    module_softcap,
    padded_ids,
    prefix_fingerprint,
    static_keys,
    weighted_ids,
)
from .contract import approx_args, approx_state, method, report_scanned

STATE_KEY = "ivf"


def _faiss() -> Any:
    """faiss, imported on first use so the package imports without it."""
    try:
        import faiss
    except ImportError:
        raise UserInputError("approx=ivf needs faiss: pip install faiss-cpu") from None
    return faiss


def static_sizes(args: dict[str, Any], topk: int) -> tuple[int, int]:
    """(sinks, window) after resolving the budget-scaled defaults (-1), see the module docstring."""
    sinks = int(args["sinks"]) if int(args["sinks"]) >= 0 else min(4, topk // 4)
    window = int(args["window"]) if int(args["window"]) >= 0 else max(1, topk // 4)
    return sinks, window


def list_counts(args: dict[str, Any], indexed: int) -> tuple[int, int]:
    """(nlist, nprobe) for an index over `indexed` keys, defaults resolved and clamped to 1..indexed."""
    nlist = int(args["nlist"]) if int(args["nlist"]) > 0 else round(math.sqrt(indexed))
    nlist = max(1, min(nlist, indexed))
    nprobe = int(args["nprobe"]) if int(args["nprobe"]) > 0 else math.ceil(nlist / 10)
    return nlist, max(1, min(nprobe, nlist))


class _Index:
    """One sequence's IVF indexes, one per (batch row, KV head), and every indexed key's list."""

    def __init__(self, key: torch.Tensor, nlist: int) -> None:
        faiss = _faiss()
        batch, kv_heads, length, dim = key.shape
        self.nlist = nlist
        self.indexes = []
        self.lists = torch.empty(batch, kv_heads, 0, dtype=torch.long)
        rows = _host_rows(key)
        for b in range(batch):
            for h in range(kv_heads):
                quantizer = faiss.IndexFlatIP(dim)
                index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
                index.cp.min_points_per_centroid = 1  # short sequences: no "too few points" warnings
                index.train(rows[b, h])
                self.indexes.append((quantizer, index))  # the quantizer must outlive the index (faiss does not own it)
        self.length = 0
        self.extend(key)

    def extend(self, key: torch.Tensor) -> None:
        """Add keys self.length..K-1 to their nearest lists (no retraining), as decode steps do."""
        new = _host_rows(key[:, :, self.length :])
        batch, kv_heads = new.shape[:2]
        lists = torch.empty(batch, kv_heads, new.shape[2], dtype=torch.long)
        for i, (quantizer, index) in enumerate(self.indexes):
            b, h = divmod(i, kv_heads)
            index.add(new[b, h])
            lists[b, h] = torch.from_numpy(quantizer.search(new[b, h], 1)[1][:, 0].astype(np.int64))
        self.lists = torch.cat([self.lists, lists], dim=2)
        self.length = key.shape[2]
        self.fingerprint = prefix_fingerprint(key, self.length)

    def probed(self, query: torch.Tensor, nprobe: int) -> torch.Tensor:
        """Bool (B, Hq, Q, nlist): the lists each query probes (its nprobe best centroids by inner product)."""
        batch, q_heads, q_len, dim = query.shape
        kv_heads = len(self.indexes) // batch
        rows = query.detach().float().cpu().reshape(batch, kv_heads, -1, dim).numpy()
        chosen = torch.zeros(batch, kv_heads, rows.shape[2], self.nlist, dtype=torch.bool)
        for i, (quantizer, _) in enumerate(self.indexes):
            b, h = divmod(i, kv_heads)
            best = torch.from_numpy(quantizer.search(np.ascontiguousarray(rows[b, h]), nprobe)[1].astype(np.int64))
            chosen[b, h].scatter_(-1, best, True)
        return chosen.view(batch, q_heads, q_len, self.nlist).to(query.device)


def _host_rows(key: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(key.detach().float().cpu().numpy())


def sequence_index(module: torch.nn.Module, key: torch.Tensor, args: dict[str, Any]) -> _Index:
    """The index of the module's current sequence: built at its first call, extended when the cache has grown.

    The probe empties the state at each new sequence; a key tensor whose indexed prefix differs (a caller that did
    not reset) also gets a fresh index, so nothing leaks from one document into the next.
    """
    state = approx_state(module)
    index = state.get(STATE_KEY)
    length = key.shape[2]
    if index is not None and not holds_prefix(index.fingerprint, index.length, key):
        index = None
    if index is None:
        index = state[STATE_KEY] = _Index(key, list_counts(args, length)[0])
    elif index.length < length:
        index.extend(key)
    return index


@method(sinks=-1, window=-1, nlist=-1, nprobe=-1)
def ivf(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float,
    topk: int,
) -> tuple[torch.Tensor, None, torch.Tensor]:
    args = approx_args(module, ivf)
    batch, q_heads, q_len, _ = query.shape
    k_len = key.shape[2]
    k = min(topk, k_len)
    visible = attention_mask.expand(batch, -1, q_len, k_len)
    sinks, window = static_sizes(args, topk)
    index = sequence_index(module, key, args)
    nprobe = list_counts(args, index.length)[1]
    probed = index.probed(query, min(nprobe, index.nlist))
    kernels = numba_module("approx._ivf_scan") if query.device.type == "cpu" and sinks + window <= k else None
    if kernels is not None:
        output, ids, searched = _search_and_attend(kernels, query, key, value, visible, index, probed, sinks, window,
                                                   scaling, module_softcap(module), k)  # fmt: skip
        report_scanned(module, index.nlist + searched.double())
        return output, None, ids
    static = static_keys(visible, sinks, window).expand(batch, q_heads, q_len, k_len)
    lists = index.lists.to(query.device).repeat_interleave(q_heads // key.shape[1], dim=1)[:, :, None, :]
    in_probed = probed.gather(-1, lists.expand(-1, -1, q_len, -1))
    searchable = visible & ~static & in_probed
    logits = masked_logits(query, key, visible, scaling, module_softcap(module))
    budget = (k - static.sum(-1, keepdim=True)).clamp(min=0)
    best_scores, best_ids = logits.masked_fill(~searchable, float("-inf")).topk(k, dim=-1)
    keep = (torch.arange(k, device=query.device) < budget) & (best_scores > float("-inf"))
    chosen = static | torch.zeros_like(static).scatter(-1, best_ids, keep)
    ids, taken = padded_ids(chosen, visible, k)
    weights = torch.softmax(logits.gather(-1, ids).masked_fill(~taken, float("-inf")), dim=-1).nan_to_num(0.0)
    report_scanned(module, index.nlist + searchable.sum(-1).double())
    return weighted_ids(weights, ids, value), None, ids


def _search_and_attend(  # type: ignore[no-untyped-def]
    kernels, query, key, value, visible, index: _Index, probed, sinks: int, window: int, scaling: float,
    softcap: float | None, k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CPU path: each row scores only the keys of the lists it probes (`_ivf_scan.py`). Returns (output,
    ids, keys searched per row)."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    rows = batch * q_heads * q_len
    mask = visible.reshape(-1, k_len).contiguous()
    ids, out = torch.empty(rows, k, dtype=torch.int64), torch.empty(rows, value.shape[-1])
    searched = torch.empty(rows, dtype=torch.int64)
    row_kernel(kernels, "ivf_attend", rows)(
        query.float().reshape(rows, dim).contiguous().numpy(),
        key.float().contiguous().view(batch * kv_heads, k_len, dim).numpy(),
        value.float().contiguous().view(batch * kv_heads, k_len, -1).numpy(), row_groups(batch, q_heads, kv_heads, q_len),
        mask.numpy(), mask_rows(batch, q_heads, q_len, visible.shape[1]), *_list_members(kernels, index, k_len),
        probed.reshape(rows, -1).contiguous().numpy(), sinks, window, float(scaling), float(softcap or 0.0),
        ids.numpy(), searched.numpy(), out.numpy(),
    )  # fmt: skip
    shape = (batch, q_heads, q_len)
    return out.view(*shape, -1), ids.view(*shape, k), searched.view(shape)


def _list_members(kernels, index: _Index, k_len: int) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """Each (batch row, KV head)'s inverted lists over its first k_len keys: (members (G, k_len), the keys grouped by
    list and in key order within one; offsets (G, nlist + 1), where each list starts in them)."""
    lists = np.ascontiguousarray(index.lists.reshape(-1, index.lists.shape[-1])[:, :k_len].numpy())
    members = np.empty_like(lists)
    offsets = np.empty((lists.shape[0], index.nlist + 1), dtype=np.int64)
    kernels.list_members(lists, index.nlist, members, offsets)
    return members, offsets
