"""`loki`: keys scored in a low-rank PCA space calibrated offline, exact attention over the best k.

Paper: Prajwal Singhania, Siddharth Singh, Shwai He, Soheil Feizi, Abhinav Bhatele, "Loki: Low-rank Keys for
Efficient Sparse Attention", 2024, arXiv:2406.02542.

Rule. Per layer and KV head, the principal components of the keys (eigenvectors of their covariance, by decreasing
variance) are computed once from a calibration text other than the one measured (`calibrate_loki`). At attention
time the query and the keys are projected on the first r components (r = `rank`; the default 0 means D/4, the
paper's d_f = 0.25) and the approximate scores (q P_r) . (k P_r) rank the visible keys; the topk best are kept and
exact attention (soft-capped where the model soft-caps) is taken over them. The budget topk is used as given: the
method returns min(topk, visible) keys. The basis is orthonormal, so with r = D the approximate scores are the exact
ones and Loki is exact top-k. Under `ret-approx-hf` the basis is calibrated when the method is set (`prepare`): one
forward pass over `calibration` (approx_args; default the bundled German prose, or a .txt path), first
`calibration_tokens` tokens. No basis, no fallback: a module without a calibrated basis raises a one-line
UserInputError, since a basis from the measured text itself would flatter the method.

Cost model: scanned = (r / D) * visible_keys per query (the reduced-rank dot products).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ...errors import UserInputError
from ..topk import placeholder_ids, row_topk
from .common import attend_valid, module_softcap, scores_against, seen_width, shared_causal_first, shared_scores
from .contract import approx_args, method, report_scanned
from .reduced import causal_reduced_topk

NEG_INF = float("-inf")


@method(rank=0, calibration="de", calibration_tokens=1024)
def loki(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float,
    topk: int,
) -> tuple[torch.Tensor, None, torch.Tensor]:
    batch, q_heads, q_len, dim = query.shape
    k = min(topk, key.shape[2])
    k_len = seen_width(attention_mask, at_least=k)  # a causal chunk's later keys are seen by none of its queries
    rank = loki_rank(int(approx_args(module, loki)["rank"]), dim)
    basis = _basis(module, key)[:, :, :rank]  # (Hkv, D, r)
    visible = attention_mask[..., :k_len].expand(batch, -1, q_len, k_len)
    reduced_query = _project(query, basis)
    reduced_key_t = _project(key[:, :, :k_len], basis).transpose(-1, -2)
    first = shared_causal_first(module, query)
    # On a plainly causal chunk the reduced scores are never written (`reduced.causal_reduced_topk`, every
    # component weighted by the query's projection); elsewhere they are a matmul, masked, then a top-k.
    picked = None
    if first is not None:
        dims = torch.arange(reduced_query.shape[-1], device=query.device).expand(reduced_query.shape)
        picked = causal_reduced_topk(reduced_query * scaling, dims, reduced_key_t, k, first, None, with_lse=False)
    if picked is None:
        approx = scores_against(reduced_query, reduced_key_t, scaling)
        if first is None:  # (a plainly causal chunk's top-k stops at each row's own key: no mask needed)
            approx.masked_fill_(~visible, NEG_INF)
        picked = row_topk(approx, k, first)
    ids, valid = placeholder_ids(*picked[:2])
    output = attend_valid(
        query, key, value, ids, valid, scaling, module_softcap(module), shared_scores(module, query)
    )
    seen = visible.sum(-1).expand(batch, q_heads, q_len)
    report_scanned(module, seen * (rank / dim))
    return output, None, ids


def loki_rank(rank: int, dim: int) -> int:
    """The rank used: `rank` if set (clamped to 1..D), else D/4."""
    return min(dim, max(1, rank if rank > 0 else dim // 4))


def loki_basis(keys: torch.Tensor) -> torch.Tensor:
    """Principal directions (Hkv, D, D) of calibration keys (B, Hkv, K, D) or (Hkv, N, D): column i of head h is its
    i-th component by decreasing variance. Computed in float64; pass the keys of real tokens only."""
    if keys.dim() == 4:
        keys = keys.transpose(0, 1).flatten(1, 2)
    if keys.dim() != 3 or keys.shape[1] < 2:
        raise UserInputError(f"calibrate_loki needs keys (B, Hkv, K, D) with K >= 2, got shape {tuple(keys.shape)}")
    centred = keys.double() - keys.double().mean(1, keepdim=True)
    covariance = centred.transpose(1, 2) @ centred / keys.shape[1]
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    return vectors.flip(-1).float()


def calibrate_loki(model_or_modules: torch.nn.Module | Sequence[torch.nn.Module], keys_per_layer: Sequence) -> None:
    """Store each attention module's basis as `module._loki_basis` from that layer's calibration keys.

    `model_or_modules`: the attention modules in layer order, or a model the hook is installed on (its modules are
    found by their layer number). `keys_per_layer[i]`: layer i's keys (B, Hkv, K, D) from a forward pass over a
    calibration text, e.g. captured by a probe's `after(call, output)` as `call.key`."""
    modules = _attention_modules(model_or_modules)
    if len(modules) != len(keys_per_layer):
        raise UserInputError(
            f"calibrate_loki got keys for {len(keys_per_layer)} layers but the model has {len(modules)}"
        )
    for module, keys in zip(modules, keys_per_layer):
        keys = torch.as_tensor(keys)
        module._loki_basis = loki_basis(keys).to(keys.device)


def prepare(lm: Any) -> None:
    """Calibrate every layer of `lm` (a RetApproxLM: model, tokenizer, hook_state) before it measures anything.

    The calibration text is `calibration` from approx_args: a haystack language code (default "de": the bundled
    German prose, a text the bundled English tasks never measure) or the path of a .txt file; its first
    `calibration_tokens` tokens go through the model once, with no probe counting, and each layer's keys give its
    basis."""
    from ...haystack import load_haystack_text
    from ...haystack.languages import LANGUAGES

    modules = _attention_modules(lm.model)
    args = approx_args(modules[0], loki)
    source = str(args["calibration"])
    text = load_haystack_text(source) if source in LANGUAGES else load_haystack_text("en", path=source)
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, : int(args["calibration_tokens"])]
    if ids.shape[1] < 2:
        raise UserInputError(f"approx=loki calibration text {source!r} has fewer than 2 tokens; give a longer text")
    keys: dict[int, torch.Tensor] = {}

    class KeyCapture:
        def before(self, call: Any) -> None:
            return None

        def after(self, call: Any, output: torch.Tensor) -> None:
            keys[call.layer] = call.key.detach()

    from ..hook import probes_replaced  # here: hook.py imports approx/

    with probes_replaced(lm.hook_state, [KeyCapture()]), torch.no_grad():
        lm.model(ids.to(lm.model.device))
    calibrate_loki(modules, [keys[module._lmr_layer] for module in modules])


loki.prepare = prepare  # type: ignore[attr-defined]


def _attention_modules(model_or_modules: torch.nn.Module | Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    if not isinstance(model_or_modules, torch.nn.Module):
        return list(model_or_modules)
    found = [m for m in model_or_modules.modules() if hasattr(m, "_lmr_layer")]
    if not found:
        raise UserInputError("calibrate_loki: no hooked attention module in this model; pass the modules in order")
    return sorted(found, key=lambda m: m._lmr_layer)


def _basis(module: torch.nn.Module, key: torch.Tensor) -> torch.Tensor:
    basis = getattr(module, "_loki_basis", None)
    kv_heads, dim = key.shape[1], key.shape[-1]
    if basis is None:
        raise UserInputError(
            "approx=loki needs a PCA basis calibrated on another text: call "
            "lm_eval_retrieval.attention.approx.loki.calibrate_loki(model, keys_per_layer) first"
        )
    if tuple(basis.shape) != (kv_heads, dim, dim):
        expected = (kv_heads, dim, dim)
        raise UserInputError(f"loki basis has shape {tuple(basis.shape)}, expected (Hkv, D, D) = {expected}")
    return basis.to(key.device, torch.float32)


def _project(rows: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Rows (B, H, N, D), H a multiple of Hkv (head h uses basis h // (H/Hkv)), onto `basis` (Hkv, D, r)."""
    batch, heads, length, dim = rows.shape
    kv_heads = basis.shape[0]
    grouped = rows.float().reshape(batch, kv_heads, (heads // kv_heads) * length, dim)
    return torch.matmul(grouped, basis).view(batch, heads, length, -1)
