"""Quest, Loki and SparQ against their papers' rules, written out per query in float64; their identities; and a
run through the real probe on tiny models (left padding, GQA, prefill then cached decode)."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from lm_eval_retrieval.attention.approx.contract import reset_state, take_scanned
from lm_eval_retrieval.attention.approx.exact_topk import exact_topk
from lm_eval_retrieval.attention.approx.loki import calibrate_loki, loki
from lm_eval_retrieval.attention.approx.quest import quest, quest_page_bounds
from lm_eval_retrieval.attention.approx.sparq import sparq
from lm_eval_retrieval.errors import UserInputError
from test_approx_probe import _batch, analysed_run
from tiny_models import VOCAB, tiny_model

BATCH, Q_HEADS, KV_HEADS, Q_LEN, K_LEN, DIM, K = 2, 6, 2, 12, 83, 16, 8
SCALING = 0.3
quest_module = sys.modules[quest.__module__]


def make_inputs(seed: int = 1, q_len: int = Q_LEN, k_len: int = K_LEN):
    """Random q/k/v and a mask with causality, left padding (row 1), a sliding window cut (row 0, query 3) and a
    query that sees fewer than K keys (row 0, query 0)."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(BATCH, Q_HEADS, q_len, DIM, generator=gen)
    key = torch.randn(BATCH, KV_HEADS, k_len, DIM, generator=gen)
    value = torch.randn(BATCH, KV_HEADS, k_len, DIM, generator=gen)
    mask = torch.ones(BATCH, 1, q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    mask[1, :, :, :21] = False
    if q_len > 3:
        mask[0, :, 0, 5:] = False
        mask[0, :, 3, :30] = False
    return query, key, value, mask


def module_with(**args) -> torch.nn.Module:
    module = torch.nn.Module()
    module._approx_args = dict(args)
    return module


def capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return softcap * torch.tanh(scores / softcap) if softcap else scores


def per_query(query, key, value, mask):
    """Yields (b, h, q, q vector, keys, values, visible key ids) in float64, GQA by h // group."""
    group = query.shape[1] // key.shape[1]
    for b in range(query.shape[0]):
        for h in range(query.shape[1]):
            keys, values = key[b, h // group].double(), value[b, h // group].double()
            for q in range(query.shape[2]):
                seen = mask[b, 0, q].nonzero().flatten().tolist()
                yield b, h, q, query[b, h, q].double(), keys, values, seen


def attend(vec, keys, values, chosen, scaling, softcap):
    if not chosen:
        return torch.zeros(values.shape[-1], dtype=torch.float64)
    weights = torch.softmax(capped(keys[chosen] @ vec * scaling, softcap), dim=0)
    return weights @ values[chosen]


def quest_reference(query, key, value, mask, scaling, k, size, softcap=None, read=None):
    """Per query: pages of `size` key positions; a page's bound = sum_d max(q_d m_d, q_d M_d) * scaling over the
    keys of the page the query sees; pages read by decreasing bound until they hold k visible keys; exact attention
    over the k best visible keys of those pages. Also records each query's pages read in `read` (B, Hq, Q), if
    given."""
    sets, out = {}, torch.zeros(*query.shape[:3], value.shape[-1], dtype=torch.float64)
    for b, h, q, vec, keys, values, seen in per_query(query, key, value, mask):
        pages: dict[int, list[int]] = {}
        for j in seen:
            pages.setdefault(j // size, []).append(j)
        bound = {}
        for p, members in pages.items():
            low, high = keys[members].min(0).values, keys[members].max(0).values
            bound[p] = float(torch.maximum(vec * low, vec * high).sum()) * scaling
        candidates: list[int] = []
        for p in sorted(pages, key=lambda p: -bound[p]):
            if len(candidates) >= k:
                break
            candidates += pages[p]
            if read is not None:
                read[b, h, q] += 1
        chosen = sorted(candidates, key=lambda j: -float(keys[j] @ vec))[:k]
        sets[b, h, q] = set(chosen)
        out[b, h, q] = attend(vec, keys, values, chosen, scaling, softcap)
    return sets, out


def loki_reference(query, key, value, mask, scaling, k, basis, rank, softcap=None):
    """Per query: approximate scores (q P_r) . (k P_r) over visible keys; exact attention over the k best."""
    sets, out = {}, torch.zeros(*query.shape[:3], value.shape[-1], dtype=torch.float64)
    group = query.shape[1] // key.shape[1]
    for b, h, q, vec, keys, values, seen in per_query(query, key, value, mask):
        proj = basis[h // group, :, :rank].double()
        approx = {j: float((vec @ proj) @ (keys[j] @ proj)) for j in seen}
        chosen = sorted(seen, key=lambda j: -approx[j])[:k]
        sets[b, h, q] = set(chosen)
        out[b, h, q] = attend(vec, keys, values, chosen, scaling, softcap)
    return sets, out


def sparq_reference(query, key, value, mask, scaling, k, rank, softcap=None):
    """Algorithm 1 of SparQ per query: i1 = r largest |q_i|; s_hat = softmax(q[i1] . K[:, i1] * scaling /
    sqrt(|q[i1]|_1 / |q|_1)); i2 = top-k of s_hat; alpha = s_hat[i2].sum(); out = alpha * attn over i2 + (1 - alpha)
    * mean of the visible values."""
    sets, out = {}, torch.zeros(*query.shape[:3], value.shape[-1], dtype=torch.float64)
    for b, h, q, vec, keys, values, seen in per_query(query, key, value, mask):
        if not seen:
            sets[b, h, q] = set()
            continue
        dims = sorted(range(vec.shape[0]), key=lambda d: -abs(float(vec[d])))[:rank]
        share = float(vec[dims].abs().sum() / vec.abs().sum())
        approx = capped(keys[seen][:, dims] @ vec[dims] * scaling / math.sqrt(share), softcap)
        s_hat = torch.softmax(approx, dim=0)
        top = sorted(range(len(seen)), key=lambda i: -float(s_hat[i]))[:k]
        chosen = [seen[i] for i in top]
        alpha = float(s_hat[top].sum())
        sets[b, h, q] = set(chosen)
        mean = values[seen].mean(0)
        out[b, h, q] = alpha * attend(vec, keys, values, chosen, scaling, softcap) + (1 - alpha) * mean
    return sets, out


def assert_same_choice(ids, mask, sets, k):
    for (b, h, q), chosen in sets.items():
        row = ids[b, h, q].tolist()
        assert len(row) == k
        got = {j for j in row if mask[b, 0, q, j]}
        assert got == chosen, (b, h, q, sorted(got), sorted(chosen))
        assert all(0 <= j < mask.shape[-1] for j in row)


def softcapped(module, softcap):
    if softcap:
        module._lmr_softcap = softcap
    return module


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("size", [4, 16])
@pytest.mark.parametrize(("numba", "q_len"), [(True, Q_LEN), (True, K_LEN), (False, Q_LEN)])  # serial, parallel
def test_quest_follows_its_rule(
    size: int, softcap: float | None, numba: bool, q_len: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not numba:  # the tensor rule GPUs run
        monkeypatch.setattr(quest_module, "numba_module", lambda name: None)
    query, key, value, mask = make_inputs(q_len=q_len)
    module = softcapped(module_with(page_size=size), softcap)
    output, scores, ids = quest(module, query, key, value, mask, SCALING, K)
    read = torch.zeros(*query.shape[:3])
    sets, expected = quest_reference(query, key, value, mask, SCALING, K, size, softcap, read)
    assert scores is None and output.dtype == torch.float32 and output.shape == (*query.shape[:3], DIM)
    assert_same_choice(ids, mask, sets, K)
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-6)
    scanned = take_scanned(module)
    visible = mask.sum(-1).expand(BATCH, Q_HEADS, q_len)
    torch.testing.assert_close(scanned.float(), 2 * visible / size + size * read)  # the pages read, as the rule reads


def test_quest_page_size_one_is_exact_topk() -> None:
    query, key, value, mask = make_inputs(2)
    out, _, ids = quest(module_with(page_size=1), query, key, value, mask, SCALING, K)
    exact_out, _, exact_ids = exact_topk(torch.nn.Module(), query, key, value, mask, SCALING, K)
    torch.testing.assert_close(out, exact_out, rtol=1e-5, atol=1e-6)
    real = mask.any(-1).expand(BATCH, Q_HEADS, Q_LEN)  # rows that see nothing have only placeholders
    visible_sets = lambda i: [  # noqa: E731
        {j for j in i[b, h, q].tolist() if mask[b, 0, q, j]} for b, h, q in real.nonzero().tolist()
    ]
    assert visible_sets(ids) == visible_sets(exact_ids)


@pytest.mark.parametrize("size", [1, 4, 16])
@pytest.mark.parametrize("numba", [True, False])
def test_quest_page_bounds_cover_every_key_in_the_page(size: int, numba: bool, monkeypatch) -> None:
    if not numba:
        monkeypatch.setattr(quest_module, "numba_module", lambda name: None)
    query, key, value, mask = make_inputs(3)
    bounds, _, _ = quest_page_bounds(module_with(), query, key, mask.expand(BATCH, -1, -1, -1), SCALING, size)
    group = Q_HEADS // KV_HEADS
    for b in range(BATCH):
        for h in range(Q_HEADS):
            scores = query[b, h].double() @ key[b, h // group].double().T * SCALING
            for q in range(Q_LEN):
                for j in mask[b, 0, q].nonzero().flatten().tolist():
                    assert float(bounds[b, h, q, j // size]) >= float(scores[q, j]) - 1e-5
    assert torch.all(bounds[~mask.any(-1).expand(BATCH, Q_HEADS, Q_LEN)] == float("-inf"))


def test_quest_chunked_prefill_and_cached_decode_match_one_call() -> None:
    """The probe hands a prefill over in query chunks against the same keys, then one query per decode step;
    the summaries kept in the state must give what a fresh computation gives."""
    query, key, value, mask = make_inputs(4, q_len=K_LEN, k_len=K_LEN)
    module = module_with(page_size=4)
    whole, _, whole_ids = quest(module, query, key, value, mask, SCALING, K)
    reset_state(module)
    parts = [quest(module, query[:, :, a:b], key, value, mask[:, :, a:b], SCALING, K) for a, b in ((0, 50), (50, 83))]
    torch.testing.assert_close(torch.cat([p[0] for p in parts], 2), whole)
    assert torch.equal(torch.cat([p[2] for p in parts], 2), whole_ids)
    # decode: one more key, state carried over from the prefill against a fresh state
    step_q, step_k, step_v, _ = make_inputs(5, q_len=1, k_len=K_LEN + 1)
    keys, values = torch.cat([key, step_k[:, :, -1:]], 2), torch.cat([value, step_v[:, :, -1:]], 2)
    step_mask = torch.ones(BATCH, 1, 1, K_LEN + 1, dtype=torch.bool)
    step_mask[1, :, :, :21] = False
    carried = quest(module, step_q, keys, values, step_mask, SCALING, K)
    fresh = quest(module_with(page_size=4), step_q, keys, values, step_mask, SCALING, K)
    torch.testing.assert_close(carried[0], fresh[0])
    assert torch.equal(carried[2], fresh[2])


def test_quest_two_documents_in_a_row_each_get_what_they_get_alone() -> None:
    def document(module, seed):
        query, key, value, mask = make_inputs(seed, q_len=40, k_len=40)
        prefill = quest(module, query, key, value, mask, SCALING, K)
        step_q, step_k, step_v, _ = make_inputs(seed + 100, q_len=1, k_len=41)
        keys, values = torch.cat([key, step_k[:, :, -1:]], 2), torch.cat([value, step_v[:, :, -1:]], 2)
        decode = quest(module, step_q, keys, values, torch.ones(BATCH, 1, 1, 41, dtype=torch.bool), SCALING, K)
        return prefill, decode

    shared = module_with(page_size=4)
    document(shared, 10)
    reset_state(shared)
    in_a_row = document(shared, 11)
    alone = document(module_with(page_size=4), 11)
    for got, want in zip(in_a_row, alone):
        torch.testing.assert_close(got[0], want[0])
        assert torch.equal(got[2], want[2])


def random_basis(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(KV_HEADS, DIM, DIM, generator=gen))[0]


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("rank", [0, 6])
def test_loki_follows_its_rule(rank: int, softcap: float | None) -> None:
    query, key, value, mask = make_inputs(6)
    module = softcapped(module_with(rank=rank), softcap)
    module._loki_basis = random_basis()
    output, _, ids = loki(module, query, key, value, mask, SCALING, K)
    used = rank or DIM // 4
    sets, expected = loki_reference(query, key, value, mask, SCALING, K, module._loki_basis, used, softcap)
    assert_same_choice(ids, mask, sets, K)
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(take_scanned(module), mask.sum(-1).expand(BATCH, Q_HEADS, Q_LEN) * used / DIM)


def test_loki_full_rank_is_exact_topk_and_calibration_orders_components() -> None:
    query, key, value, mask = make_inputs(7)
    module = module_with(rank=DIM)
    gen = torch.Generator().manual_seed(13)
    spread = torch.full((DIM,), 0.5)
    spread[0] = 5.0  # one clearly widest direction
    calibration = torch.randn(1, KV_HEADS, 200, DIM, generator=gen) * spread
    calibrate_loki([module], [calibration])
    assert module._loki_basis.shape == (KV_HEADS, DIM, DIM)
    assert module._loki_basis[0, :, 0].abs().argmax() == 0  # the first component is the widest direction
    out, _, ids = loki(module, query, key, value, mask, SCALING, K)
    exact_out, _, exact_ids = exact_topk(torch.nn.Module(), query, key, value, mask, SCALING, K)
    torch.testing.assert_close(out, exact_out, rtol=1e-5, atol=1e-5)
    sets = {(b, h, q): {j for j in exact_ids[b, h, q].tolist() if mask[b, 0, q, j]} for b, h, q, *_ in
            per_query(query, key, value, mask)}  # fmt: skip
    assert_same_choice(ids, mask, sets, K)


def test_loki_without_a_basis_says_how_to_calibrate() -> None:
    query, key, value, mask = make_inputs()
    with pytest.raises(UserInputError, match="calibrate_loki"):
        loki(module_with(), query, key, value, mask, SCALING, K)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("rank", [0, 5])
@pytest.mark.parametrize("q_len", [Q_LEN, K_LEN])
def test_sparq_follows_its_rule(rank: int, softcap: float | None, q_len: int) -> None:
    query, key, value, mask = make_inputs(8, q_len=q_len)
    mask[1, :, 0] = False  # a row that sees nothing: output 0, no valid id
    module = softcapped(module_with(rank=rank), softcap)
    output, _, ids = sparq(module, query, key, value, mask, SCALING, K)
    used = rank or DIM // 8
    sets, expected = sparq_reference(query, key, value, mask, SCALING, K, used, softcap)
    assert_same_choice(ids, mask, sets, K)
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-6)
    seen = mask.sum(-1).expand(BATCH, Q_HEADS, q_len)
    torch.testing.assert_close(take_scanned(module), seen * used / DIM + seen.clamp(max=K))


def test_sparq_full_rank_picks_the_exact_topk() -> None:
    query, key, value, mask = make_inputs(9)
    _, _, ids = sparq(module_with(rank=DIM), query, key, value, mask, SCALING, K)
    _, _, exact_ids = exact_topk(torch.nn.Module(), query, key, value, mask, SCALING, K)
    sets = {(b, h, q): {j for j in exact_ids[b, h, q].tolist() if mask[b, 0, q, j]} for b, h, q, *_ in
            per_query(query, key, value, mask)}  # fmt: skip
    assert_same_choice(ids, mask, sets, K)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("q_len", [Q_LEN, K_LEN])  # the kernel on the calling thread, in numba's pool
@pytest.mark.parametrize("name", ["sparq", "loki"])
def test_a_plainly_causal_chunk_follows_the_rule_without_its_scores_written(
    name: str, q_len: int, softcap: float | None
) -> None:
    """Where the probe says a chunk is plainly causal (query i sees keys 0 .. first + i), sparq and loki score
    each row from its few components in one kernel (`reduced.causal_reduced_topk`) instead of a (queries x keys)
    matmul and a masked top-k: the choice and the output still follow the paper's rule, and that kernel ran."""
    from lm_eval_retrieval.attention.approx import reduced
    from lm_eval_retrieval.attention.approx.common import sharing_chunk_logits

    query, key, value, _ = make_inputs(13, q_len=q_len)
    first = K_LEN - q_len
    mask = torch.ones(BATCH, 1, q_len, K_LEN, dtype=torch.bool).tril(first)
    module = softcapped(module_with(), softcap)
    module._loki_basis = random_basis(4)
    fn = {"sparq": sparq, "loki": loki}[name]
    calls = []
    own = reduced.causal_reduced_topk
    with pytest.MonkeyPatch.context() as patch:
        counted = lambda *args, **kwargs: calls.append(1) or own(*args, **kwargs)  # noqa: E731
        patch.setattr(sys.modules[fn.__module__], "causal_reduced_topk", counted)
        with sharing_chunk_logits(module, query, mask, lambda: None, None, first):
            output, _, ids = fn(module, query, key, value, mask, SCALING, K)
    assert calls
    if name == "sparq":
        sets, expected = sparq_reference(query, key, value, mask, SCALING, K, DIM // 8, softcap)
    else:
        sets, expected = loki_reference(query, key, value, mask, SCALING, K, module._loki_basis, DIM // 4, softcap)
    assert_same_choice(ids, mask, sets, K)
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-6)


def with_loki_calibrated(model) -> None:
    """Loki's basis from the keys of another text than the one measured."""
    torch.manual_seed(99)
    other = torch.randint(1, VOCAB, (1, 48))
    _, capture, _ = analysed_run(model, exact_topk, other, torch.ones(1, 49, dtype=torch.long), decode=False)
    calibrate_loki(model, [call["key"] for call in sorted(capture.calls, key=lambda c: c["layer"])])


@pytest.mark.parametrize("name", ["quest", "loki", "sparq"])
def test_a_mask_shared_by_the_batch_gives_what_its_copies_give(name: str) -> None:
    """The probe hands plain causal calls a (1, 1, Q, K) mask."""
    query, key, value, _ = make_inputs(12, q_len=K_LEN, k_len=K_LEN)
    shared = torch.ones(1, 1, K_LEN, K_LEN, dtype=torch.bool).tril()
    fn = {"quest": quest, "loki": loki, "sparq": sparq}[name]
    runs = []
    for mask in (shared, shared.expand(BATCH, -1, -1, -1).clone()):
        module = module_with()
        module._loki_basis = random_basis()
        runs.append(fn(module, query, key, value, mask, SCALING, K))
    torch.testing.assert_close(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][2], runs[1][2])


PROBE_ARCHS = [("llama", "sdpa"), ("gemma3", "sdpa"), ("mistral", "eager"), ("gemma2", "eager")]


@pytest.mark.parametrize(("arch", "base"), PROBE_ARCHS)
@pytest.mark.parametrize("name", ["quest", "loki", "sparq"])
def test_through_the_probe_with_padding_gqa_and_decode(name: str, arch: str, base: str) -> None:
    model = tiny_model(arch, attn=base)
    fn = {"quest": quest, "loki": loki, "sparq": sparq}[name]
    if name == "loki":
        with_loki_calibrated(model)
    for module in model.modules():
        if hasattr(module, "_lmr_layer"):
            reset_state(module)
            module._approx_args = {"page_size": 4} if name == "quest" else {}
    ids, padding = _batch()
    probe, _, logits = analysed_run(model, fn, ids, padding)
    stats = probe.stats
    counted = stats.queries > 0
    assert counted.any()
    for field in ("recall", "error_norm", "exact_topk_mass", "approx_topk_mass"):
        assert torch.isfinite(stats.means(field)[counted]).all(), field
    recall = stats.means("recall")[counted]
    assert torch.all((recall >= 0) & (recall <= 1))
    assert all(torch.isfinite(part).all() for part in logits)
