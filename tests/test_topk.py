"""The blocked top-k (numba best-blocks scan on CPU, torch block candidates elsewhere) against torch.topk, and the
exact_topk attention over its ids against a float64 computation from the definition."""

from __future__ import annotations

import pytest
import torch

from lm_eval_retrieval.attention import topk as topk_module
from lm_eval_retrieval.attention.topk import BLOCK, row_topk


def _scores(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    scores = torch.randn(*shape) * 3
    scores[..., -5:] = float("-inf")  # causal future keys at the end of every row
    scores.view(-1, shape[-1])[0] = float("-inf")  # a padding row: nothing visible
    scores.view(-1, shape[-1])[1, :-5] = float("-inf")
    scores.view(-1, shape[-1])[1, 3] = 2.0  # a row with one visible key
    scores.view(-1, shape[-1])[2, 40:60] = 7.0  # ties in one block
    return scores


def _assert_same_set(values, ids, scores, k) -> None:
    expected = scores.topk(k, dim=-1).values
    torch.testing.assert_close(values, expected, rtol=0, atol=0)
    finite = values > float("-inf")
    assert torch.equal(scores.gather(-1, ids)[finite], values[finite])
    assert int(ids.min()) >= 0 and int(ids.max()) < scores.shape[-1]
    for row_ids in ids.reshape(-1, k):  # distinct ids, placeholders too (as torch.topk's: -inf entries)
        assert len(set(row_ids.tolist())) == k
    assert torch.equal(scores.gather(-1, ids)[~finite], values[~finite])


@pytest.mark.parametrize("width", [5 * BLOCK * 10 + 7, 40 * BLOCK, 700, 33])
@pytest.mark.parametrize("k", [1, 10])
@pytest.mark.parametrize("q_len", [40, 1])  # 2 x 9 x 40 rows: the parallel kernel; 9 rows (a decode step): serial
def test_row_topk_equals_torch_topk(width: int, k: int, q_len: int) -> None:
    scores = _scores((2, 9, q_len, width), seed=width + k + q_len)
    values, ids = row_topk(scores, k)
    _assert_same_set(values, ids, scores, k)


@pytest.mark.parametrize("width", [5 * BLOCK * 10 + 7, 40 * BLOCK])
def test_torch_block_path_equals_torch_topk(width: int) -> None:
    """The path GPUs (and CPUs without numba) take."""
    scores = _scores((1, 3, 17, width), seed=width)
    values, ids = topk_module._block_candidates(scores, 10, width // BLOCK)
    _assert_same_set(values, ids, scores, 10)


def test_numba_kernel_is_used_on_cpu() -> None:
    assert topk_module._numba_kernels() is not None, "numba is a dependency: the CPU path must not silently fall back"


@pytest.mark.parametrize("numba", [True, False])  # without numba (and on GPUs) the same rule runs as torch ops
@pytest.mark.parametrize("q_len", [40, 3])  # 40 x 9 rows: the parallel kernel; 3 x 9: the serial one
def test_attend_topk_equals_the_definition(q_len: int, numba: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not numba:
        monkeypatch.setattr(topk_module, "_numba_kernels", lambda: None)
    torch.manual_seed(q_len)
    batch, q_heads, kv_heads, k_len, dim, k = 2, 9, 3, 300, 16, 10
    scores = torch.randn(batch, q_heads, q_len, k_len) * 2
    scores[0, 0, 0] = float("-inf")  # sees nothing
    scores[0, 0, 1, 4:] = float("-inf")  # sees 4 keys < k
    value = torch.randn(batch, kv_heads, k_len, dim)
    exact = torch.randn(batch, q_heads, q_len, dim)
    lse = torch.logsumexp(scores, dim=-1)
    top, ids = row_topk(scores, k)
    output, error, mass = topk_module.attend_topk(top, ids, value, exact, lse)

    group = q_heads // kv_heads
    for b in range(batch):
        for h in range(q_heads):
            for q in range(q_len):
                row = scores[b, h, q].double()
                keep = torch.isfinite(row).nonzero().flatten()
                chosen = keep[row[keep].argsort(descending=True)[:k]]
                if len(chosen):
                    weights = torch.softmax(row[chosen], dim=0)
                    expected = weights @ value[b, h // group, chosen].double()
                    held = (row[chosen] - torch.logsumexp(row[keep], dim=0)).exp().sum()
                else:
                    expected, held = torch.zeros(dim, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
                reference = exact[b, h, q].double()
                torch.testing.assert_close(output[b, h, q].double(), expected, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(mass[b, h, q].double(), held, rtol=1e-5, atol=1e-7)
                rel = (expected - reference).norm() / reference.norm()
                torch.testing.assert_close(error[b, h, q].double(), rel, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("numba", [True, False])
@pytest.mark.parametrize("heads, size", [(9, 40), (2, 3)])  # 720 rows: numba's pool; 6 rows: the calling thread
def test_row_topk_stops_at_each_causal_rows_own_key(heads: int, size: int, numba: bool, monkeypatch) -> None:
    """A causal chunk's row i sees columns up to first + i: the later ones must never be picked, whatever they hold
    (the probe leaves them unmasked for the CPU kernel)."""
    if not numba:
        monkeypatch.setattr(topk_module, "_numba_kernels", lambda: None)
    width, k = 300, 10
    first = width - size
    torch.manual_seed(size)
    scores = torch.randn(2, heads, size, width)
    future = torch.arange(width)[None, :] > (first + torch.arange(size))[:, None]
    masked = scores.masked_fill(future, float("-inf"))
    scores.masked_fill_(future, 50.0)  # future keys that would win if they were read
    values, ids = row_topk(scores.clone(), k, causal_first=first)
    _assert_same_set(values, ids, masked, k)
    short = torch.randn(1, heads, size, 4 * BLOCK + 5)  # rows that see fewer than k keys at the chunk's start
    first = short.shape[-1] - size
    seen = short.masked_fill(torch.arange(short.shape[-1])[None, :] > (first + torch.arange(size))[:, None], -1e9)
    values, ids = row_topk(short.clone(), first + size, causal_first=first)
    expected = seen.topk(first + size, dim=-1).values
    finite = values > float("-inf")
    torch.testing.assert_close(values[finite], expected[finite], rtol=0, atol=0)
    assert bool((finite.sum(-1) == (first + 1 + torch.arange(size))).all())


@pytest.mark.parametrize("numba", [True, False])
@pytest.mark.parametrize("heads, size", [(9, 40), (2, 3)])  # 720 rows: numba's pool; 6 rows: the calling thread
@pytest.mark.parametrize("causal", [True, False])
def test_row_topk_lse_is_the_top_k_and_the_log_normaliser(heads: int, size: int, causal: bool, numba: bool,
                                                           monkeypatch) -> None:  # fmt: skip
    """row_topk_lse: the same top-k as row_topk, and each row's log-sum-exp over the scores it sees, against
    torch.logsumexp in float64 of the masked scores: causal rows read up to their own key whatever the later columns
    hold; masked (-inf) keys and a row that sees nothing (-inf) count as nothing."""
    if not numba:
        monkeypatch.setattr(topk_module, "_numba_kernels", lambda: None)
    width, k = 300, 10
    first = width - size
    torch.manual_seed(size + causal)
    scores = torch.randn(2, heads, size, width) * 4
    masked = scores.clone()
    masked[0, 0, :, 7:90] = float("-inf")  # keys a row cannot see, -inf as a method masks them
    masked[1, 1, 0] = float("-inf")  # a row that sees nothing
    scores = masked.clone()
    if causal:
        future = torch.arange(width)[None, :] > (first + torch.arange(size))[:, None]
        masked = masked.masked_fill(future, float("-inf"))
        scores.masked_fill_(future & (scores > float("-inf")), 50.0)  # unmasked future keys, never to be read
    values, ids, lse = topk_module.row_topk_lse(scores.clone(), k, causal_first=first if causal else None)
    reference = torch.logsumexp(masked.double(), dim=-1)
    torch.testing.assert_close(lse.double(), reference, rtol=2e-7, atol=1e-6)
    assert lse[1, 1, 0] == float("-inf")
    expected_values, _ = row_topk(masked.clone(), k)
    torch.testing.assert_close(values, expected_values, rtol=0, atol=0)
    finite = values > float("-inf")
    assert torch.equal(masked.gather(-1, ids)[finite], values[finite])


def test_exact_step_equals_the_definition() -> None:
    """A decode step of exact_topk in one kernel: the output over each query's top-k and the statistics it adds,
    against float64 from the definition (one query per head, two sequences, grouped heads)."""
    torch.manual_seed(7)
    batch, q_heads, kv_heads, width, dim, k = 2, 9, 3, 300, 16, 10
    scores = torch.randn(batch, q_heads, 1, width) * 2
    value = torch.randn(batch, kv_heads, width, dim)
    exact = torch.randn(batch, q_heads, 1, dim)
    lse = torch.logsumexp(scores, dim=-1)
    sums = torch.zeros(7, q_heads, dtype=torch.float64)
    sums[:, 0] = 5.0  # earlier steps' sums are added to, not replaced
    output = topk_module.exact_step(scores, k, value, exact, lse, sums, k / width)
    expected_sums = torch.zeros(7, q_heads, dtype=torch.float64)
    expected_sums[:, 0] = 5.0
    group = q_heads // kv_heads
    for b in range(batch):
        for h in range(q_heads):
            row = scores[b, h, 0].double()
            chosen = row.argsort(descending=True)[:k]
            expected = torch.softmax(row[chosen], dim=0) @ value[b, h // group, chosen].double()
            torch.testing.assert_close(output[b, h, 0].double(), expected, rtol=1e-5, atol=1e-6)
            held = (row[chosen] - torch.logsumexp(row, dim=0)).exp().sum()
            error = (expected - exact[b, h, 0].double()).norm() / exact[b, h, 0].double().norm()
            expected_sums[:, h] += torch.stack(
                [torch.tensor(1.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64), error, held, held,
                 torch.tensor(k / width, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)]
            )  # fmt: skip
    torch.testing.assert_close(sums, expected_sums, rtol=1e-5, atol=1e-6)
