"""The ANN group: `magicpig` (LSH sampling) and `ivf` (inverted-file retrieval) against per-query float64 references
written from the papers' rules, their identities, the real probe on tiny models, and per-sequence state."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from lm_eval_retrieval.attention.approx.contract import reset_state, set_approx_args, take_scanned
from lm_eval_retrieval.attention.approx.ivf import ivf
from lm_eval_retrieval.attention.approx.magicpig import PLANE_SEED, magicpig
from lm_eval_retrieval.errors import UserInputError
from test_approx_probe import _batch, analysed_run
from tiny_models import tiny_model


def _inputs(seed=1, batch=2, q_heads=4, kv_heads=2, q_len=12, k_len=48, dim=16):
    torch.manual_seed(seed)
    query = torch.randn(batch, q_heads, q_len, dim)
    key, value = torch.randn(batch, kv_heads, k_len, dim), torch.randn(batch, kv_heads, k_len, dim)
    mask = torch.ones(batch, 1, q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    mask[1, :, :, :10] = False  # left padding in the second row
    return query, key, value, mask


def _module(layer=3, softcap=None, **args):
    module = torch.nn.Module()
    module._lmr_layer = layer
    if softcap:
        module._lmr_softcap = softcap
    set_approx_args(module, args)
    return module


def _static(visible, sinks, window):
    """First `sinks` and last `window` of the visible key ids (a list)."""
    return set(visible[:sinks]) | set(visible[len(visible) - window :] if window else [])


def _score(q, k, scaling, softcap):
    s = float(q @ k) * scaling
    return softcap * math.tanh(s / softcap) if softcap else s


def _chosen_set(row, visible_ids):
    return {int(j) for j in row} & set(visible_ids)


# ---------------------------------------------------------------- magicpig


def _sampling_probability(cosine, bits, tables, least):
    hit = (1 - math.acos(max(-1.0, min(1.0, cosine))) / math.pi) ** bits
    below = sum(math.comb(tables, c) * hit**c * (1 - hit) ** (tables - c) for c in range(least))
    return 1 - below


def magicpig_reference(layer, query, key, value, mask, scaling, bits, tables, least, sinks, window, center, floor,
                       softcap=None, prompt_len=None):  # fmt: skip
    """Per query, float64: static keys; candidates centred by the mean of the prompt's candidates (this call's keys
    that some query sees, but the first `sinks` and last `window`), once per batch row and KV head; SimHash codes
    per table from the layer's documented hyperplanes; sampled when >= `least` tables collide; weights
    exp(s) / (p + floor). `prompt_len`: the prompt was the first keys only (a decode step after it)."""
    batch, q_heads, q_len, dim = query.shape
    group = q_heads // key.shape[1]
    planes = torch.randn(dim, bits * tables, generator=torch.Generator().manual_seed(PLANE_SEED + layer)).double()
    sets, out = {}, torch.zeros(batch, q_heads, q_len, value.shape[-1], dtype=torch.float64)
    for b in range(batch):
        tokens = [j for j in mask[b].any(0).any(0).nonzero().flatten().tolist() if j < (prompt_len or key.shape[2])]
        prompt = [j for j in tokens if j not in _static(tokens, sinks, window)]
        for h in range(q_heads):
            keys, values = key[b, h // group].double(), value[b, h // group].double()
            centre = keys[prompt].mean(0) if prompt and center else torch.zeros(dim, dtype=torch.float64)
            for i in range(q_len):
                q = query[b, h, i].double()
                visible = mask[b, 0, i].nonzero().flatten().tolist()
                static = _static(visible, sinks, window)
                candidates = [j for j in visible if j not in static]
                q_code = (q @ planes > 0).view(tables, bits)
                terms = [(_score(q, keys[j], scaling, softcap), j) for j in static]
                sampled = set()
                for j in candidates:
                    k_code = ((keys[j] - centre) @ planes > 0).view(tables, bits)
                    if int((k_code == q_code).all(-1).sum()) >= least:
                        centred = keys[j] - centre
                        p = _sampling_probability(float(q @ centred / (q.norm() * centred.norm())), bits, tables, least)
                        terms.append((_score(q, keys[j], scaling, softcap) - math.log(p + floor), j))
                        sampled.add(j)
                sets[b, h, i] = static | sampled
                if terms:
                    top = max(t for t, _ in terms)
                    w = {j: math.exp(t - top) for t, j in terms}
                    out[b, h, i] = sum(w[j] * values[j] for j in w) / sum(w.values())
    return sets, out


def _kernel_spy(monkeypatch, numba: bool) -> list:
    """Route magicpig to its tensor path (numba False), or record that it asked for its kernels."""
    module_of = sys.modules[magicpig.__module__]
    asked: list = []
    real = module_of.numba_module
    monkeypatch.setattr(module_of, "numba_module", lambda name: asked.append(name) or (real(name) if numba else None))
    return asked


def _check_magicpig(ids, output, sets, expected, mask):
    for (b, h, i), chosen in sets.items():
        assert _chosen_set(ids[b, h, i], mask[b, 0, i].nonzero().flatten().tolist()) == chosen, (b, h, i)
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize(("numba", "q_len"), [(True, 12), (True, 48), (False, 12)])  # serial, parallel, tensors
def test_magicpig_follows_its_rule(softcap, center, numba: bool, q_len: int, monkeypatch) -> None:
    asked = _kernel_spy(monkeypatch, numba)
    query, key, value, mask = _inputs(q_len=q_len)
    mask[0, :, 0, 5:] = False  # a query that sees only 5 keys
    args = dict(bits=3, tables=6, min_collisions=2, sinks=2, window=3, center=center, p_floor=1e-4)
    module = _module(layer=5, softcap=softcap, **args)
    output, scores, ids = magicpig(module, query, key, value, mask, 0.25, 6)
    assert asked and set(asked) == {"approx._magicpig_scan"}
    assert scores is None and output.dtype == torch.float32 and ids.shape[:3] == query.shape[:3]
    assert int(ids.min()) >= 0 and int(ids.max()) < key.shape[2]
    sets, expected = magicpig_reference(5, query, key, value, mask, 0.25, 3, 6, 2, 2, 3, center, 1e-4, softcap)
    _check_magicpig(ids, output, sets, expected, mask)
    seen = mask.sum(-1).double()  # (B, 1, Q)
    candidates = seen - seen.clamp(max=2 + 3)
    torch.testing.assert_close(take_scanned(module), (18 * (1 + candidates / 16)).expand(2, 4, -1))


@pytest.mark.parametrize("numba", [True, False])
def test_magicpig_hashes_the_prompt_once_and_extends_it_at_decode(numba: bool, monkeypatch) -> None:
    """A prompt handed over in query chunks (with its tokens recorded, as the probe does) equals the prompt in one
    call, though the first chunk's rows see none of the later keys that the centre averages; a decode step's key is
    centred by the prompt's centre, not by a mean that includes it."""
    _kernel_spy(monkeypatch, numba)
    query, key, value, mask = _inputs(q_len=30, k_len=30)
    args = dict(bits=3, tables=6, sinks=1, window=2)
    whole = magicpig(_module(**args), query, key, value, mask, 0.25, 6)
    chunked = _module(**args)
    reset_state(chunked, mask[:, 0].diagonal(0, -2, -1))
    parts = [magicpig(chunked, query[:, :, s : s + 10], key, value, mask[:, :, s : s + 10], 0.25, 6)
             for s in (0, 10, 20)]  # fmt: skip
    torch.testing.assert_close(torch.cat([p[0] for p in parts], dim=2), whole[0])
    for part, start in zip(parts, (0, 10, 20)):
        for b in range(2):
            for i in range(10):
                visible = mask[b, 0, start + i].nonzero().flatten().tolist()
                for h in range(4):
                    assert _chosen_set(part[2][b, h, i], visible) == _chosen_set(whole[2][b, h, start + i], visible)
    torch.manual_seed(5)
    step_q, new_k, new_v = torch.randn(2, 4, 1, 16), 3 + torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16)
    key2, value2 = torch.cat([key, new_k], dim=2), torch.cat([value, new_v], dim=2)
    step_mask = torch.ones(2, 1, 1, 31, dtype=torch.bool)
    step_mask[1, :, :, :10] = False
    output, _, ids = magicpig(chunked, step_q, key2, value2, step_mask, 0.25, 6)
    sets, expected = magicpig_reference(3, step_q, key2, value2, step_mask, 0.25, 3, 6, 2, 1, 2, True, 1e-4,
                                        prompt_len=30)  # fmt: skip
    _check_magicpig(ids, output, sets, expected, step_mask)


@pytest.mark.parametrize(
    "args",
    [
        dict(bits=4, tables=9, min_collisions=0),  # every candidate sampled
        dict(bits=4, tables=9, min_collisions=1),
        dict(bits=2, tables=150, min_collisions=30),  # more tables than an int8 counts
        dict(bits=13, tables=5, min_collisions=1),  # too many bits for buckets: every candidate compared
        dict(bits=20, tables=4, min_collisions=1),  # int32 codes
    ],
)
@pytest.mark.parametrize("q_len", [12, 48])  # a decode-like call compares codes; a prompt's goes through buckets
def test_magicpig_kernel_equals_the_tensor_rule(args, q_len: int, monkeypatch) -> None:
    """The CPU kernel against the tensor path (itself held to the reference above) wherever their mechanics part:
    sampling without collisions, int16 collision counts, codes wider than 16 bits, the compared and the bucketed
    search; and with the probe's scores of the chunk shared, which the kernel reads instead of dot products."""
    from lm_eval_retrieval.attention.approx.common import sharing_chunk_logits

    query, key, value, mask = _inputs(q_len=q_len)
    mask[0, :, 0, 5:] = False
    args = dict(args, sinks=2, window=3)
    got = magicpig(_module(**args), query, key, value, mask, 0.25, 6)
    scores = (query @ key.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.25).contiguous()
    shared_module = _module(**args)
    with sharing_chunk_logits(shared_module, query, mask, lambda: scores, scores, None):
        shared = magicpig(shared_module, query, key, value, mask, 0.25, 6)
    _kernel_spy(monkeypatch, False)
    expected = magicpig(_module(**args), query, key, value, mask, 0.25, 6)
    for result in (got, shared):
        torch.testing.assert_close(result[0], expected[0], rtol=1e-5, atol=1e-6)
        for b in range(2):
            for h in range(4):
                for i in range(q_len):
                    visible = mask[b, 0, i].nonzero().flatten().tolist()
                    assert _chosen_set(result[2][b, h, i], visible) == _chosen_set(expected[2][b, h, i], visible)
    if args["min_collisions"] == 0:  # p = 1 for every candidate: each visible key is attended
        assert got[2].shape[-1] == key.shape[2]


def test_magicpig_static_window_covering_everything_is_exact_attention() -> None:
    query, key, value, mask = _inputs()
    module = _module(bits=4, tables=4, sinks=0, window=10_000)
    output, _, ids = magicpig(module, query, key, value, mask, 0.25, 4)
    keys, values = key.double().repeat_interleave(2, dim=1), value.double().repeat_interleave(2, dim=1)
    logits = (query.double() @ keys.transpose(-1, -2) * 0.25).masked_fill(~mask, -math.inf)
    exact = torch.softmax(logits, -1) @ values
    torch.testing.assert_close(output.double(), exact, rtol=1e-5, atol=1e-6)
    assert ids.shape[-1] == key.shape[2]  # every visible key is in the set: the width grows past topk


def test_magicpig_estimate_is_unbiased_over_hyperplane_seeds() -> None:
    """Mean over 200 seeds (layers) of the numerator sum_S e^s v / p and denominator sum_S e^s / p within 3 standard
    errors of the exact sums, with p computed here from the rule; each seed's output is their ratio."""
    torch.manual_seed(11)
    dim, k_len, bits, tables, least = 8, 20, 2, 6, 2
    query = torch.randn(1, 1, 1, dim)
    key, value = torch.randn(1, 1, k_len, dim), torch.randn(1, 1, k_len, 3)
    mask = torch.ones(1, 1, 1, k_len, dtype=torch.bool)
    q, keys, values = query[0, 0, 0].double(), key[0, 0].double(), value[0, 0].double()
    centred = keys - keys.mean(0)
    scores = keys @ q * 0.3
    cosines = [float(q @ c / (q.norm() * c.norm())) for c in centred]
    p = torch.tensor([_sampling_probability(cosine, bits, tables, least) for cosine in cosines])
    assert 0.02 < float(p.min()) and float(p.max()) < 0.99  # a genuinely random sample
    estimates, hits = [], torch.zeros(k_len)
    for seed in range(200):
        module = _module(layer=seed, bits=bits, tables=tables, min_collisions=least, sinks=0, window=0, p_floor=0.0)
        output, _, ids = magicpig(module, query, key, value, mask, 0.3, 4)
        # every key is visible, so filler slots repeat a sampled id; an empty sample has output 0
        sampled = sorted(set(ids[0, 0, 0].tolist())) if bool(output.abs().sum() > 0) else []
        weights = torch.zeros(k_len, dtype=torch.float64)
        weights[sampled] = scores[sampled].exp() / p[sampled]
        numerator, denominator = weights @ values, weights.sum()
        hits[sampled] += 1
        if sampled:
            torch.testing.assert_close(output[0, 0, 0].double(), numerator / denominator, rtol=1e-5, atol=1e-6)
        estimates.append(torch.cat([numerator, denominator[None]]))
    estimates = torch.stack(estimates)
    exact = torch.cat([scores.exp() @ values, scores.exp().sum()[None]])
    error = estimates.std(0) / math.sqrt(len(estimates))
    assert torch.all((estimates.mean(0) - exact).abs() < 3 * error), (estimates.mean(0), exact, error)
    frequency_error = (p * (1 - p) / 200).sqrt()
    assert torch.all((hits / 200 - p).abs() < 4 * frequency_error + 1e-9)


# ---------------------------------------------------------------- ivf


def ivf_reference(query, key, value, mask, scaling, topk, sinks, window, nlist, nprobe, built=None, softcap=None):
    """Per query, float64 output: static keys, then faiss's own IVF search (an index built here over the first
    `built` keys, the rest added) over every probed key, filtered by visibility and the static set, best first."""
    import faiss  # a dependency (setup.cfg): a missing faiss must fail, not skip
    batch, q_heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    built = built or k_len
    group = q_heads // kv_heads
    sets, out = {}, torch.zeros(batch, q_heads, q_len, value.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for kv in range(kv_heads):
            rows = key[b, kv].float().numpy()
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.min_points_per_centroid = 1
            index.train(rows[:built].copy())
            index.add(rows[:built].copy())
            if built < k_len:
                index.add(rows[built:].copy())
            index.nprobe = nprobe
            for h in range(kv * group, (kv + 1) * group):
                _, found = index.search(query[b, h].float().numpy(), k_len)
                for i in range(q_len):
                    visible = mask[b, 0, i].nonzero().flatten().tolist()
                    static = _static(visible, sinks, window)
                    ranked = [int(j) for j in found[i] if j >= 0 and j in visible and j not in static]
                    chosen = static | set(ranked[: max(0, min(topk, k_len) - len(static))])
                    sets[b, h, i] = chosen
                    if chosen:
                        q = query[b, h, i].double()
                        s = {j: _score(q, key[b, kv, j].double(), scaling, softcap) for j in chosen}
                        top = max(s.values())
                        w = {j: math.exp(x - top) for j, x in s.items()}
                        out[b, h, i] = sum(w[j] * value[b, kv, j].double() for j in w) / sum(w.values())
    return sets, out


def _check_ivf(ids, output, sets, expected, mask):
    for (b, h, i), chosen in sets.items():
        assert _chosen_set(ids[b, h, i], mask[b, 0, i].nonzero().flatten().tolist()) == chosen, (b, h, i)
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize(("numba", "q_len"), [(True, 12), (True, 48), (False, 12)])  # serial, parallel, tensors
def test_ivf_follows_its_rule(softcap, numba: bool, q_len: int, monkeypatch) -> None:
    if not numba:
        monkeypatch.setattr(sys.modules[ivf.__module__], "numba_module", lambda name: None)
    query, key, value, mask = _inputs(q_len=q_len)
    mask[0, :, 0, 5:] = False
    module = _module(softcap=softcap, sinks=2, window=2, nlist=6, nprobe=2)
    output, scores, ids = ivf(module, query, key, value, mask, 0.25, 8)
    assert scores is None and output.dtype == torch.float32 and ids.shape == (*query.shape[:3], 8)
    sets, expected = ivf_reference(query, key, value, mask, 0.25, 8, 2, 2, 6, 2, softcap=softcap)
    _check_ivf(ids, output, sets, expected, mask)
    scanned = take_scanned(module)
    assert scanned.shape == query.shape[:3] and torch.all(scanned >= 6)


def test_ivf_defaults_scale_with_the_budget() -> None:
    query, key, value, mask = _inputs(k_len=49)
    output, _, ids = ivf(_module(), query, key, value, mask, 0.25, 10)
    # topk=10: 2 sinks, 2 recent; sqrt(49) = 7 lists, ceil(7/10) = 1 probed
    sets, expected = ivf_reference(query, key, value, mask, 0.25, 10, 2, 2, 7, 1)
    _check_ivf(ids, output, sets, expected, mask)


def test_ivf_probing_every_list_is_exact_topk_outside_the_static_window() -> None:
    query, key, value, mask = _inputs()
    module = _module(sinks=1, window=2, nlist=5, nprobe=10**6)
    _, _, ids = ivf(module, query, key, value, mask, 0.25, 7)
    for b in range(2):
        for h in range(4):
            for i in range(query.shape[2]):
                visible = mask[b, 0, i].nonzero().flatten().tolist()
                static = _static(visible, 1, 2)
                rest = sorted((j for j in visible if j not in static),
                              key=lambda j: -float(query[b, h, i].double() @ key[b, h // 2, j].double()))  # fmt: skip
                assert _chosen_set(ids[b, h, i], visible) == static | set(rest[: 7 - len(static)])


def test_ivf_chunks_and_decode_extend_one_index() -> None:
    """A prefill handed over in query chunks equals the prefill in one call; a decode step adds its key to the
    prefill's index (no retraining), as the reference that adds it after training shows."""
    query, key, value, mask = _inputs(q_len=30, k_len=30)
    args = dict(sinks=1, window=2, nlist=5, nprobe=2)
    whole = ivf(_module(**args), query, key, value, mask, 0.25, 6)
    chunked = _module(**args)
    parts = [ivf(chunked, query[:, :, s : s + 10], key, value, mask[:, :, s : s + 10], 0.25, 6) for s in (0, 10, 20)]
    torch.testing.assert_close(torch.cat([p[0] for p in parts], dim=2), whole[0])
    assert torch.equal(torch.cat([p[2] for p in parts], dim=2), whole[2])
    torch.manual_seed(5)
    step_q, new_k, new_v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16)
    key2, value2 = torch.cat([key, new_k], dim=2), torch.cat([value, new_v], dim=2)
    step_mask = torch.ones(2, 1, 1, 31, dtype=torch.bool)
    step_mask[1, :, :, :10] = False
    output, _, ids = ivf(chunked, step_q, key2, value2, step_mask, 0.25, 6)
    sets, expected = ivf_reference(step_q, key2, value2, step_mask, 0.25, 6, 1, 2, 5, 2, built=30)
    _check_ivf(ids, output, sets, expected, step_mask)


@pytest.mark.parametrize("reset", [True, False])
@pytest.mark.parametrize("name", ["magicpig", "ivf"])
def test_two_documents_each_get_what_they_get_alone(name: str, reset: bool) -> None:
    """Per-sequence state (hash tables, an index) never leaks into the next document, whether the caller resets
    the state (as the probe does) or not."""
    fn, args = {
        "magicpig": (magicpig, dict(bits=3, tables=6, sinks=1, window=2)),
        "ivf": (ivf, dict(sinks=1, window=2, nlist=4, nprobe=1)),
    }[name]
    docs = [_inputs(seed=s, q_len=24, k_len=24) for s in (1, 2)]
    alone = [fn(_module(**args), *doc, 0.25, 5) for doc in docs]
    shared = _module(**args)
    for doc, expected in zip(docs, alone):
        got = fn(shared, *doc, 0.25, 5)
        torch.testing.assert_close(got[0], expected[0])
        assert torch.equal(got[2], expected[2])
        if reset:
            reset_state(shared)


def test_ivf_without_faiss_names_the_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    query, key, value, mask = _inputs()
    with pytest.raises(UserInputError, match="pip install faiss-cpu"):
        ivf(_module(), query, key, value, mask, 0.25, 4)


def test_the_package_imports_without_faiss() -> None:
    code = (
        "import sys; sys.modules['faiss'] = None\n"
        "import lm_eval_retrieval.attention.approx, lm_eval_retrieval.attention.approx.ivf\n"
        "import lm_eval_retrieval.attention.approx.magicpig\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------- the real probe


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("name", ["magicpig", "ivf"])
def test_through_the_probe_with_padding_gqa_and_decode(arch: str, name: str) -> None:
    fn, args = {
        "magicpig": (magicpig, dict(bits=3, tables=8, sinks=1, window=2)),
        "ivf": (ivf, dict(sinks=1, window=1, nlist=4, nprobe=1)),
    }[name]
    model = tiny_model(arch)
    for module in model.modules():
        set_approx_args(module, args)
    ids, padding = _batch()
    probe, capture, _ = analysed_run(model, fn, ids, padding)
    stats = probe.stats
    counted = stats.queries > 0
    assert counted.any() and any(call["step"] == 1 for call in capture.calls)
    for field in stats.FIELDS:  # recall, error norm, masses and the reported costs
        assert torch.isfinite(stats.means(field)[counted]).all(), field
    recall = stats.means("recall")[counted]
    assert torch.all((recall >= 0) & (recall <= 1))
    assert float(recall.mean()) < 1.0  # genuinely approximate at these settings
    if "scanned" in stats.FIELDS:
        assert torch.all(stats.means("scanned")[counted] > 0)
