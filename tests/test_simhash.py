"""`simhash` (numba kernel on CPU, torch elsewhere) against its rule, written out per query in float64."""

from __future__ import annotations

import sys

import pytest
import torch

from lm_eval_retrieval.attention.approx import simhash
from lm_eval_retrieval.attention.approx.simhash import _hyperplanes

SIMHASH_MODULE = sys.modules["lm_eval_retrieval.attention.approx.simhash"]


def reference(module, query, key, value, mask, scaling, k, softcap=None):  # type: ignore[no-untyped-def]
    """Per query: codes = signs of projections on the layer's hyperplanes; the k visible keys with the fewest
    differing bits, ties to the more recent key; softmax attention over them. Returns (id sets, outputs)."""
    batch, q_heads, q_len, dim = query.shape
    group = q_heads // key.shape[1]
    planes = _hyperplanes(module, dim, module._approx_args["bits"], query.device).double()
    sets, outputs = {}, torch.zeros(batch, q_heads, q_len, value.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            keys, values = key[b, h // group].double(), value[b, h // group].double()
            key_bits = keys @ planes > 0
            for q in range(q_len):
                visible = mask[b, 0, q].nonzero().flatten().tolist()
                query_bits = query[b, h, q].double() @ planes > 0
                distance = {j: int((key_bits[j] != query_bits).sum()) for j in visible}
                chosen = sorted(visible, key=lambda j: (distance[j], -j))[:k]
                sets[b, h, q] = set(chosen)
                if chosen:
                    scores = keys[chosen] @ query[b, h, q].double() * scaling
                    if softcap:
                        scores = softcap * torch.tanh(scores / softcap)
                    outputs[b, h, q] = torch.softmax(scores, dim=0) @ values[chosen]
    return sets, outputs


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("q_len", [12, 24])  # 144 rows: the kernel on the calling thread; 288: numba's pool
@pytest.mark.parametrize("bits, k", [(12, 8), (3, 30), (40, 8)])  # 3 bits: ties everywhere, most keys swapped out
def test_simhash_follows_its_rule(  # type: ignore[no-untyped-def]
    path: str, softcap: float | None, q_len: int, bits: int, k: int, monkeypatch
) -> None:
    if path == "torch":
        monkeypatch.setattr(SIMHASH_MODULE, "_numba_kernel", lambda: None)
    else:
        assert SIMHASH_MODULE._numba_kernel() is not None, "numba is a dependency: the CPU path must use the kernel"
    torch.manual_seed(1)
    batch, q_heads, kv_heads, k_len, dim = 2, 6, 2, 80, 16
    shapes = ((q_heads, q_len), (kv_heads, k_len), (kv_heads, k_len))
    query, key, value = (torch.randn(batch, h, n, dim) for h, n in shapes)
    mask = torch.ones(batch, 1, q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    mask[1, :, :, :20] = False  # left padding in the second sequence
    mask[0, :, 0, 5:] = False  # a query that sees 5 keys (< k)
    module = torch.nn.Module()
    module._lmr_layer, module._approx_args = 4, {"bits": bits}
    if softcap:
        module._lmr_softcap = softcap
    output, _, ids = simhash(module, query, key, value, mask, 0.25, k)
    sets, expected = reference(module, query, key, value, mask, 0.25, k, softcap)
    for (b, h, q), chosen in sets.items():
        row = ids[b, h, q].tolist()
        assert chosen <= set(row), (b, h, q)
        assert all(not mask[b, 0, q, j] for j in set(row) - chosen)  # placeholders only where fewer than k are visible
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-6)


def test_decode_steps_extend_the_kept_codes_in_place() -> None:
    """Decode steps add one key each: its code is written into the kept buffer (no re-projection, no copy), and
    every step still follows the rule; other keys of the same shape (another document) start afresh."""
    from lm_eval_retrieval.attention.approx.contract import approx_state

    torch.manual_seed(5)
    batch, q_heads, kv_heads, dim, k = 1, 6, 2, 16, 8
    key, value = torch.randn(batch, kv_heads, 60, dim), torch.randn(batch, kv_heads, 60, dim)
    module = torch.nn.Module()
    module._lmr_layer, module._approx_args = 2, {"bits": 10}
    buffers = set()
    for length in (40, 41, 42, 43):
        query = torch.randn(batch, q_heads, 1, dim)
        mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
        output, _, ids = simhash(module, query, key[:, :, :length], value[:, :, :length], mask, 0.25, k)
        sets, expected = reference(module, query, key[:, :, :length], value[:, :, :length], mask, 0.25, k)
        for (b, h, q), chosen in sets.items():
            assert chosen == set(ids[b, h, q].tolist())
        torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-6)
        buffers.add(approx_state(module)["simhash_codes"][0].ctypes.data)
    assert len(buffers) == 1, "each decode step writes into the buffer kept since the prefill"
    other = torch.randn(batch, kv_heads, 44, dim)
    query = torch.randn(batch, q_heads, 1, dim)
    mask = torch.ones(batch, 1, 1, 44, dtype=torch.bool)
    output, _, ids = simhash(module, query, other, value[:, :, :44], mask, 0.25, k)
    sets, expected = reference(module, query, other, value[:, :, :44], mask, 0.25, k)
    assert all(chosen == set(ids[b, h, q].tolist()) for (b, h, q), chosen in sets.items())
