"""The per-query measurements of an approximation's id set, against a plain loop over queries written from their
definitions, on the numba kernel (parallel and serial drivers) and on the torch path."""

from __future__ import annotations

import pytest
import torch

from lm_eval_retrieval.attention import set_metrics as metrics_module
from lm_eval_retrieval.attention.set_metrics import id_set_metrics


def reference(logits, lse, exact_ids, exact_ok, approx_ids, approx_out, exact_out, visible):  # type: ignore[no-untyped-def]
    batch, heads, size, _ = logits.shape
    out = {name: torch.zeros(batch, heads, size, dtype=torch.float64) for name in ("hits", "mass", "used", "error", "exact")}
    for b in range(batch):
        for h in range(heads):
            for c in range(size):
                exact = {int(i) for i, ok in zip(exact_ids[b, h, c], exact_ok[b, h, c]) if ok}
                chosen = {int(i) for i in approx_ids[b, h, c] if 0 <= int(i) < logits.shape[-1] and visible[b, h, c, int(i)]}
                weight = lambda i: float(torch.exp(logits[b, h, c, i].double() - lse[b, h, c].double()))  # noqa: E731
                out["hits"][b, h, c] = len(chosen & exact)
                out["used"][b, h, c] = len(chosen)
                out["mass"][b, h, c] = sum(weight(i) for i in chosen)
                out["exact"][b, h, c] = sum(weight(i) for i in exact)
                out["error"][b, h, c] = float(
                    (approx_out[b, h, c] - exact_out[b, h, c]).double().norm() / exact_out[b, h, c].double().norm()
                )
    return out


@pytest.mark.parametrize("size", [1, 3, 64])  # 1 and 3: the serial driver; 64 x 4 heads x 2: the parallel one
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("numba", [True, False])
def test_id_set_metrics_against_a_loop(size: int, masked: bool, numba: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not numba:
        monkeypatch.setattr(metrics_module, "numba_module", lambda name: None)
    generator = torch.Generator().manual_seed(size + 10 * masked)
    batch, heads, width, k, dim = 2, 4, 40, 5, 8
    first_own = width - size
    positions = torch.arange(first_own, width)
    causal = torch.arange(width)[None, :] <= positions[:, None]  # (size, width)
    if masked:  # left padding on the first sequence, one mask row for every head
        attend = causal.expand(batch, 1, size, width).clone()
        attend[0, :, :, :7] = False
        visible = attend.expand(batch, heads, size, width)
    else:
        attend, visible = None, causal.expand(batch, heads, size, width)
    logits = torch.randn(batch, heads, size, width, generator=generator).masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, -1)
    exact_scores, exact_ids = logits.topk(k, dim=-1)
    # Ids with repeats, negative ids and keys the query cannot see: none may count.
    approx_ids = torch.randint(-2, width + 3, (batch, heads, size, k + 3), generator=generator)
    approx_ids[..., 1] = approx_ids[..., 0]
    approx_out, exact_out = torch.randn(2, batch, heads, size, dim, generator=generator)
    got = id_set_metrics(
        logits, lse, exact_scores, exact_ids, approx_ids, approx_out, exact_out,
        None if masked else first_own, attend,
    )  # fmt: skip
    want = reference(logits, lse, exact_ids, exact_scores > float("-inf"), approx_ids, approx_out, exact_out, visible)
    for value, name in zip(got, ("hits", "mass", "used", "error", "exact")):
        torch.testing.assert_close(value.double(), want[name], rtol=1e-5, atol=1e-6, msg=name)
    assert float(want["hits"].sum()) > 0 and float(want["used"].sum()) > 0  # the draw exercises the counting
