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


@pytest.mark.parametrize("scanned", [None, 3.5, "per query"])
def test_id_set_step_adds_a_decode_steps_statistics(scanned) -> None:  # type: ignore[no-untyped-def]
    """A decode step measured whole (exact top-k, the id set against it, the sums): against the loop above, with the
    exact top-k from torch.topk."""
    generator = torch.Generator().manual_seed(11)
    batch, heads, width, k, dim = 2, 4, 70, 6, 8
    logits = torch.randn(batch, heads, 1, width, generator=generator)
    lse = torch.logsumexp(logits, -1)
    exact_scores, exact_ids = logits.topk(k, dim=-1)
    approx_ids = torch.randint(-2, width + 3, (batch, heads, 1, k + 3), generator=generator)
    approx_ids[..., 1] = approx_ids[..., 0]
    approx_ids[..., 2] = exact_ids[..., 0]  # at least one hit
    approx_out, exact_out = torch.randn(2, batch, heads, 1, dim, generator=generator)
    if scanned == "per query":
        scanned = torch.rand(batch, heads, 1, generator=generator) * 10
    sums = torch.zeros(7, heads, dtype=torch.float64)
    sums[:, 1] = 2.0  # earlier steps' sums are added to
    assert metrics_module.id_set_step(logits, k, lse, approx_ids, approx_out, exact_out, scanned, width, sums)
    want = reference(
        logits, lse, exact_ids, exact_scores > float("-inf"), approx_ids, approx_out, exact_out,
        torch.ones(batch, heads, 1, width, dtype=torch.bool),
    )  # fmt: skip
    if scanned is None:
        per_query = torch.full((batch, heads, 1), float("nan"), dtype=torch.float64)
    else:
        per_query = torch.as_tensor(scanned, dtype=torch.float64).expand(batch, heads, 1)
    fields = [
        torch.ones(batch, heads, 1, dtype=torch.float64), want["hits"] / k, want["error"], want["exact"], want["mass"],
        want["used"] / width, per_query / width,
    ]  # fmt: skip
    expected = torch.stack([f.sum(dim=(0, 2)) for f in fields])
    expected[:, 1] += 2.0
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
