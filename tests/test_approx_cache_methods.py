"""`streaming`, `h2o` and `snapkv` (KV-cache eviction methods as retrievers) against their papers' rules.

The references below are written from the rules, one query and one head at a time in float64, over absolute
positions: they never call the methods' helpers. The methods are driven as the probe drives them: a prefill whose
query rows arrive in chunks against all the prompt's keys, then one call per decode step (optionally against a
sliding-window cache that has dropped its oldest keys), with `reset_state` at each new sequence.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from lm_eval_retrieval.attention.approx import _cache_common as cache_common
from lm_eval_retrieval.attention.approx import common as common_module
from lm_eval_retrieval.attention.approx._cache_common import EXCLUDED, PLACEHOLDER, pick
from lm_eval_retrieval.attention.approx.contract import approx_state, reset_state, set_approx_args
from lm_eval_retrieval.attention.approx.h2o import h2o
from lm_eval_retrieval.attention.approx.snapkv import snapkv
from lm_eval_retrieval.attention.approx.streaming import streaming, streaming_ids
from lm_eval_retrieval.attention.probes import ApproxStats
from test_approx_probe import MIN_KEYS, TOPK, _batch, analysed_run, assert_matches_reference
from tiny_models import tiny_model

B, HQ, HKV, D, PROMPT, STEPS, PAD = 2, 4, 2, 8, 40, 3, 9
h2o_module = sys.modules[h2o.__module__]  # the package re-exports the function under the module's name
streaming_module = sys.modules[streaming.__module__]
snapkv_module = sys.modules[snapkv.__module__]
SCALING = 0.5


# ----------------------------------------------------------------------------------------------- inputs and driver


def sequence(seed: int = 0, window: int | None = None):
    """q/k/v for PROMPT + STEPS positions, and the absolute visibility (B, 1, N, N): causal, row 0 left-padded by
    PAD tokens (padding rows see nothing), optionally a sliding window."""
    torch.manual_seed(seed)
    n = PROMPT + STEPS
    query = torch.randn(B, HQ, n, D) * 2
    key, value = torch.randn(B, HKV, n, D) * 2, torch.randn(B, HKV, n, D)
    pos = torch.arange(n)
    visible = (pos[None, :] <= pos[:, None]).expand(B, 1, n, n).clone()
    if window:
        visible &= (pos[:, None] - pos[None, :] < window)[None, None]
    visible[0, :, :, :PAD] = False
    visible[0, :, :PAD, :] = False
    return query, key, value, visible


def module_with(args: dict | None = None, softcap: float | None = None) -> torch.nn.Module:
    module = torch.nn.Module()
    set_approx_args(module, args or {})
    if softcap:
        module._lmr_softcap = softcap
    return module


def drive(fn, module, query, key, value, visible, topk, chunk=7, cache=None):
    """Prefill rows 0..PROMPT-1 in chunks against keys 0..PROMPT-1, then each later row as a decode step against
    keys 0..row, or only the last `cache` of them (a sliding-window cache). Returns ({(b, h, row): absolute ids the
    output attends}, outputs (B, Hq, N, D))."""
    reset_state(module)
    n = query.shape[2]
    chosen, outputs = {}, torch.zeros(B, HQ, n, value.shape[-1], dtype=torch.float64)
    calls = [(s, min(PROMPT, s + chunk), 0, PROMPT) for s in range(0, PROMPT, chunk)]
    calls += [(r, r + 1, 0 if cache is None else max(0, r + 1 - cache), r + 1) for r in range(PROMPT, n)]
    for start, end, lo, hi in calls:
        mask = visible[:, :, start:end, lo:hi]
        out, _, ids = fn(module, query[:, :, start:end], key[:, :, lo:hi], value[:, :, lo:hi], mask, SCALING, topk)
        assert out.dtype == torch.float32 and out.shape == (B, HQ, end - start, D)
        assert ids.shape[:3] == (B, HQ, end - start) and int(ids.min()) >= 0 and int(ids.max()) < hi - lo
        outputs[:, :, start:end] = out.double()
        for b in range(B):
            for h in range(HQ):
                for i in range(end - start):
                    row = [int(j) for j in ids[b, h, i]]
                    chosen[b, h, start + i] = {lo + j for j in row if mask[b, 0, i, j]}
    return chosen, outputs


def visible_keys(visible, b: int, row: int) -> list[int]:
    return [j for j in range(visible.shape[-1]) if visible[b, 0, row, j]]


def softmax(scores: dict[int, float]) -> dict[int, float]:
    if not scores:
        return {}
    top = max(scores.values())
    weights = {j: math.exp(s - top) for j, s in scores.items()}
    total = sum(weights.values())
    return {j: w / total for j, w in weights.items()}


def score(query, key, b: int, h: int, row: int, j: int, softcap: float | None) -> float:
    s = float(query[b, h, row].double() @ key[b, h // (HQ // HKV), j].double()) * SCALING
    return softcap * math.tanh(s / softcap) if softcap else s


def reference_output(query, key, value, b, h, row, ids, softcap):
    probs = softmax({j: score(query, key, b, h, row, j, softcap) for j in ids})
    out = torch.zeros(value.shape[-1], dtype=torch.float64)
    for j, p in probs.items():
        out += p * value[b, h // (HQ // HKV), j].double()
    return out


def check(got, expected, query, key, value, outputs, softcap=None):
    assert got.keys() == expected.keys()
    for where, ids in expected.items():
        assert got[where] == ids, (where, sorted(got[where]), sorted(ids))
        b, h, row = where
        torch.testing.assert_close(
            outputs[b, h, row], reference_output(query, key, value, b, h, row, ids, softcap), rtol=1e-5, atol=1e-5
        )


# ------------------------------------------------------------------------------------------------------ streaming


def reference_streaming(visible, topk: int, sinks: int = 4) -> dict:
    """First min(sinks, topk - 1) visible keys + the most recent rest of the budget; all when they fit."""
    sets = {}
    s = max(0, min(sinks, topk - 1))
    for b in range(B):
        for row in range(visible.shape[2]):
            keys = visible_keys(visible, b, row)
            kept = keys if len(keys) <= topk else keys[:s] + keys[len(keys) - (topk - s) :]
            for h in range(HQ):
                sets[b, h, row] = set(kept)
    return sets


def without_numba(monkeypatch: pytest.MonkeyPatch, *modules) -> None:
    """The tensor rules GPUs run, in place of the CPU kernels."""
    for module in modules:
        monkeypatch.setattr(module, "numba_module", lambda name: None)


@pytest.mark.parametrize("topk", [1, 3, 10])
@pytest.mark.parametrize("window", [None, 12])
@pytest.mark.parametrize("numba", [True, False])
def test_streaming_keeps_sinks_and_recent_window(
    topk: int, window: int | None, numba: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not numba:
        without_numba(monkeypatch, streaming_module, common_module)
    query, key, value, visible = sequence(window=window)
    module = module_with(softcap=4.0)
    got, outputs = drive(streaming, module, query, key, value, visible, topk, cache=window)
    check(got, reference_streaming(visible, topk), query, key, value, outputs, softcap=4.0)
    assert module.__dict__["_approx_scanned"] == 0.0


def test_streaming_sinks_are_the_first_visible_keys() -> None:
    """Identity: ids == sinks + window as sets, and a left-padded row's sinks are its first real tokens."""
    query, key, value, visible = sequence()
    module = module_with({"sinks": 2})
    got, _ = drive(streaming, module, query, key, value, visible, topk=6)
    for h in range(HQ):
        assert got[0, h, 30] == {PAD, PAD + 1, 27, 28, 29, 30}
        assert got[1, h, 30] == {0, 1, 27, 28, 29, 30}
        assert got[0, h, PAD - 1] == set()  # a padding row sees nothing


def test_streaming_query_seeing_nothing_gets_zero() -> None:
    query, key, value, visible = sequence()
    out, _, ids = streaming(module_with(), query[:, :, :PAD], key[:, :, :PROMPT], value[:, :, :PROMPT],
                            visible[:, :, :PAD, :PROMPT], SCALING, 5)  # fmt: skip
    assert torch.all(out[0] == 0) and ids.shape == (B, HQ, PAD, 5)


@pytest.mark.parametrize("sinks", [0, 2, 4])
@pytest.mark.parametrize("topk", [1, 3, 10, 50])
def test_streaming_kernel_names_the_ids_the_tensor_rule_names(
    sinks: int, topk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same ids in the same order and the same valid flags: kept keys most recent first, then invisible keys, then
    repeats; on scattered masks, rows that see nothing and rows that see fewer keys than the budget."""
    torch.manual_seed(topk + sinks)
    visible = torch.rand(2, 3, 30, 40) < 0.3
    visible[0, 0, :5] = False
    visible[1, 2, 3] = True  # every key visible: no invisible filler left
    got = streaming_ids(visible, sinks, topk)
    without_numba(monkeypatch, streaming_module)
    expected = streaming_ids(visible, sinks, topk)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("q_len", [1, 40])  # the serial kernel of a decode step and the parallel one
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("given_scores", [False, True])
def test_attend_valid_kernel_equals_the_tensor_rule(
    q_len: int, softcap: float | None, given_scores: bool, monkeypatch
) -> None:
    """The kernel, and the kernel or the tensor rule reading the picked keys' scores from `scores`, against the
    tensor rule that scores every picked key itself. The given scores are only as wide as the last valid id (the
    probe's chunk width): an invalid slot past them must not be read."""
    torch.manual_seed(q_len)
    query, key, value = torch.randn(2, HQ, q_len, D) * 2, torch.randn(2, HKV, 50, D) * 2, torch.randn(2, HKV, 50, 6)
    ids = torch.randint(0, 50, (2, HQ, q_len, 7))
    ids[..., 1] = ids[..., 0]  # a repeated id counts twice where both slots are valid, as in the tensor rule
    valid = torch.rand(2, HQ, q_len, 7) < 0.7
    valid[0, 1] = False  # rows with nothing valid get 0
    valid &= ids < 45
    scores = None
    if given_scores:  # an independent scoring: one plain matmul per query head against its KV head's keys
        full = torch.einsum("bhqd,bhkd->bhqk", query, key.repeat_interleave(HQ // HKV, dim=1)) * SCALING
        scores = (softcap * torch.tanh(full / softcap) if softcap else full)[..., :45].contiguous()
    got = common_module.attend_valid(query, key, value, ids, valid, SCALING, softcap, scores)
    without_numba(monkeypatch, common_module)
    expected = common_module.attend_valid(query, key, value, ids, valid, SCALING, softcap)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.all(got[0, 1] == 0)
    if given_scores:
        from_scores = common_module.attend_valid(query, key, value, ids, valid, SCALING, softcap, scores)
        torch.testing.assert_close(from_scores, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------ h2o


def reference_h2o(query, key, visible, topk: int, ratio: float = 0.5, softcap=None):
    """Per (b, h): walk the queries in order; recent = last topk - floor(topk * ratio) visible keys, heavy = other
    visible keys with the largest attention summed over earlier queries (ties: more recent); then add this query's
    exact softmax to the sums. Returns (sets, final sums {(b, h): [K]})."""
    sets, sums = {}, {}
    n = visible.shape[2]
    heavy_count = int(topk * ratio)
    for b in range(B):
        for h in range(HQ):
            acc = [0.0] * n
            for row in range(n):
                keys = visible_keys(visible, b, row)
                if len(keys) <= topk:
                    kept = set(keys)
                else:
                    recent = keys[len(keys) - (topk - heavy_count) :]
                    others = [j for j in keys if j not in recent]
                    heavy = sorted(others, key=lambda j: (-acc[j], -j))[:heavy_count]
                    kept = set(recent) | set(heavy)
                sets[b, h, row] = kept
                for j, p in softmax({j: score(query, key, b, h, row, j, softcap) for j in keys}).items():
                    acc[j] += p
            sums[b, h] = acc
    return sets, sums


@pytest.mark.parametrize("numba", [True, False])  # the CPU kernel, and the tensor rule GPUs run
@pytest.mark.parametrize(("topk", "ratio", "softcap"), [(6, 0.5, None), (5, 0.5, 3.0), (4, 0.75, None), (4, 0.0, None)])
def test_h2o_follows_its_rule(
    topk: int, ratio: float, softcap: float | None, numba: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not numba:
        monkeypatch.setattr(h2o_module, "numba_module", lambda name: None)
    query, key, value, visible = sequence(seed=1)
    module = module_with({"heavy_ratio": ratio}, softcap)
    got, outputs = drive(h2o, module, query, key, value, visible, topk)
    expected, sums = reference_h2o(query, key, visible, topk, ratio, softcap)
    check(got, expected, query, key, value, outputs, softcap)
    scanned = module.__dict__["_approx_scanned"]
    assert scanned.shape == (B, HQ, 1) and float(scanned[1, 0, 0]) == PROMPT + STEPS


def test_h2o_accumulation_equals_a_loop_over_queries() -> None:
    """Identity: the state's accumulated attention is the sum of every earlier query's exact softmax."""
    query, key, value, visible = sequence(seed=2)
    module = module_with()
    drive(h2o, module, query, key, value, visible, 6, chunk=5)
    acc, offset = approx_state(module)["h2o_acc"]
    _, sums = reference_h2o(query, key, visible, 6)
    assert offset == 0
    for (b, h), expected in sums.items():  # the method scores in float32, the loop in float64
        torch.testing.assert_close(acc[b, h], torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("fn", "args"),
    [("h2o", {"heavy_ratio": 0.5}), ("h2o", {"heavy_ratio": 0.875}), ("snapkv", {"window": 4}),
     ("snapkv", {"window": 8, "kernel": 3})],
)  # fmt: skip
def test_eviction_kernels_equal_the_tensor_rules_on_long_rows(fn: str, args: dict, monkeypatch) -> None:
    """Rows of hundreds of keys, where the kernels pass over whole blocks of keys that cannot enter their lists
    (h2o: the previous row's heavy hitters bound the row's from below; both: once the list is full, by its last
    entry): the same ids, order and flags as the tensor rules, which rank every key, in two chunks (the second
    starts without a previous row), with left padding."""
    torch.manual_seed(11)
    n, topk = 300, 16
    query, key, value = torch.randn(B, HQ, n, D), torch.randn(B, HKV, n, D), torch.randn(B, HKV, n, D)
    key[:, :, [3, 40, 41, 150]] *= 4  # a few keys that gather attention (heavy hitters), as sinks do
    visible = torch.ones(B, 1, n, n, dtype=torch.bool).tril()
    visible[0, :, :, :PAD] = False
    visible[0, :, :PAD] = False
    method, module_of = {"h2o": (h2o, h2o_module), "snapkv": (snapkv, snapkv_module)}[fn]
    runs = []
    for numba in (True, False):
        if not numba:
            monkeypatch.setattr(module_of, "numba_module", lambda name: None)
        module = module_with(args)
        reset_state(module)
        chunks = [method(module, query[:, :, a:b], key[:, :, :b], value[:, :, :b], visible[:, :, a:b, :b], SCALING,
                         topk) for a, b in ((0, 170), (170, n))]  # fmt: skip
        runs.append(chunks)
    for (start, end), (out, _, ids), (out_t, _, ids_t) in zip(((0, 170), (170, n)), *runs):
        many = visible[:, :, start:end, :end].sum(-1).expand(ids.shape[:3]) > topk  # rows that choose
        assert bool(many.any()) and torch.equal(ids[many], ids_t[many])
        for where in (~many).nonzero().tolist():  # a row that sees at most topk keys takes them all, in any order
            assert set(ids[tuple(where)].tolist()) == set(ids_t[tuple(where)].tolist())
        torch.testing.assert_close(out, out_t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("numba", [True, False])
def test_h2o_with_a_sliding_cache_that_drops_keys(numba: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not numba:
        monkeypatch.setattr(h2o_module, "numba_module", lambda name: None)
    query, key, value, visible = sequence(seed=3, window=12)
    got, outputs = drive(h2o, module_with(), query, key, value, visible, 6, cache=12)
    expected, _ = reference_h2o(query, key, visible, 6)
    check(got, expected, query, key, value, outputs)


# --------------------------------------------------------------------------------------------------------- snapkv


def reference_snapkv(query, key, visible, topk: int, window: int = 32, kernel: int = 7, pooling: str = "max",
                     softcap=None):  # fmt: skip
    """Prompt row p: w = min(window, max(1, topk // 2), keys p sees) window keys (the last ones p sees); each prefix
    key's votes = sum over the window's queries of their exact softmax; pooled over key positions (zero padding,
    stride 1); top topk - w prefix keys (ties: more recent) + the window. Decode rows: the last prompt row's set
    plus every key from PROMPT on, as far as they are visible."""
    sets = {}
    n = visible.shape[2]
    w_max = max(1, min(window, max(1, topk // 2)))
    for b in range(B):
        for h in range(HQ):
            probs = [softmax({j: score(query, key, b, h, r, j, softcap) for j in visible_keys(visible, b, r)})
                     for r in range(n)]  # fmt: skip
            for row in range(PROMPT):
                keys = visible_keys(visible, b, row)
                if len(keys) <= topk:
                    sets[b, h, row] = set(keys)
                    continue
                w = min(w_max, len(keys))
                in_window = keys[len(keys) - w :]
                prefix = [j for j in keys if j not in in_window]
                votes = [0.0] * n
                for j in prefix:
                    votes[j] = sum(probs[r].get(j, 0.0) for r in in_window)
                pooled = {}
                for j in prefix:
                    # The paper's max_pool1d(padding=kernel // 2): keys [j - kernel // 2, j - kernel // 2 + kernel).
                    reach = range(j - kernel // 2, j - kernel // 2 + kernel)
                    around = [votes[i] if 0 <= i < n else 0.0 for i in reach]
                    pooled[j] = max(around) if pooling == "max" else sum(around) / kernel
                voted = sorted(prefix, key=lambda j: (-pooled[j], -j))[: topk - w]
                sets[b, h, row] = set(in_window) | set(voted)
            final = sets[b, h, PROMPT - 1]
            for row in range(PROMPT, n):
                keys = set(visible_keys(visible, b, row))
                sets[b, h, row] = (final | set(range(PROMPT, n))) & keys
    return sets


@pytest.mark.parametrize("numba", [True, False])  # the CPU kernel, and the tensor rule GPUs run
@pytest.mark.parametrize(
    ("topk", "args", "softcap"),
    [(8, {}, None), (10, {"pooling": "avg", "kernel": 5}, None), (6, {"window": 2}, 4.0), (3, {"kernel": 1}, None),
     (9, {"kernel": 4}, None), (12, {"pooling": "avg", "kernel": 6, "window": 3}, None)],
)  # fmt: skip
def test_snapkv_follows_its_rule(
    topk: int, args: dict, softcap: float | None, numba: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not numba:
        monkeypatch.setattr(snapkv_module, "numba_module", lambda name: None)
    query, key, value, visible = sequence(seed=4)
    module = module_with(args, softcap)
    got, outputs = drive(snapkv, module, query, key, value, visible, topk)
    expected = reference_snapkv(query, key, visible, topk, softcap=softcap, **args)
    check(got, expected, query, key, value, outputs, softcap)
    assert module.__dict__["_approx_scanned"] == 0.0  # a decode step scores no key to choose


@pytest.mark.parametrize("numba", [True, False])
def test_snapkv_prefill_chunking_does_not_matter(numba: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not numba:
        monkeypatch.setattr(snapkv_module, "numba_module", lambda name: None)
    query, key, value, visible = sequence(seed=5)
    whole = drive(snapkv, module_with(), query, key, value, visible, 8, chunk=PROMPT)
    rows = drive(snapkv, module_with(), query, key, value, visible, 8, chunk=1)
    assert whole[0] == rows[0]
    torch.testing.assert_close(whole[1], rows[1])


@pytest.mark.parametrize("numba", [True, False])
def test_snapkv_with_a_sliding_cache_that_drops_keys(numba: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not numba:
        monkeypatch.setattr(snapkv_module, "numba_module", lambda name: None)
    query, key, value, visible = sequence(seed=6, window=16)
    got, outputs = drive(snapkv, module_with(), query, key, value, visible, 8, cache=16)
    expected = reference_snapkv(query, key, visible, 8)
    check(got, expected, query, key, value, outputs)


def test_snapkv_keeps_the_prompt_selection_for_decode() -> None:
    query, key, value, visible = sequence(seed=7)
    module = module_with()
    got, _ = drive(snapkv, module, query, key, value, visible, 8)
    state = approx_state(module)
    assert state["snapkv_prompt_end"] == PROMPT
    for b in range(B):
        for h in range(HQ):
            assert got[b, h, PROMPT - 1] < got[b, h, PROMPT + STEPS - 1]
            assert got[b, h, PROMPT + STEPS - 1] - got[b, h, PROMPT - 1] == set(range(PROMPT, PROMPT + STEPS))


# ------------------------------------------------------------------------------------------- state across documents


@pytest.mark.parametrize("fn", [h2o, snapkv])
def test_two_documents_in_a_row_give_each_what_it_gets_alone(fn) -> None:
    first, second = sequence(seed=8), sequence(seed=9)
    alone = [drive(fn, module_with(), *doc, 6) for doc in (first, second)]
    module = module_with()
    in_a_row = [drive(fn, module, *doc, 6) for doc in (first, second)]  # `drive` resets as the probe does
    for got, expected in zip(in_a_row, alone):
        assert got[0] == expected[0]
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- through the probe


@pytest.mark.parametrize("arch", ["llama", "gemma3", "mistral"])
@pytest.mark.parametrize("fn", [streaming, h2o, snapkv])
def test_methods_run_through_the_probe(arch: str, fn) -> None:
    model = tiny_model(arch)
    ids, padding = _batch()
    probe, capture, _ = analysed_run(model, fn, ids, padding)
    stats = probe.stats
    counted = stats.queries > 0
    assert counted.any()
    for field in ApproxStats.FIELDS:
        assert torch.isfinite(stats.means(field)[counted]).all(), field
    recall = stats.means("recall")[counted]
    assert ((recall >= 0) & (recall <= 1)).all()
    assert (stats.means("approx_topk_mass")[counted] <= 1 + 1e-6).all()
    if fn is streaming:  # stateless: the per-query reference can call it on its own
        assert_matches_reference(probe, capture, model, padding, [ids.shape[1], ids.shape[1] + 1], approx_fn=fn)
    scanned = stats.means("scanned")[counted]  # as a fraction of the keys each query sees
    expected_scanned = {streaming: 0.0, h2o: 1.0}.get(fn)
    if expected_scanned is None:  # snapkv: 1 on prompt queries, 0 on decode steps
        assert ((scanned > 0) & (scanned <= 1)).all()
    else:
        torch.testing.assert_close(scanned, torch.full_like(scanned, expected_scanned))
    modules = {call["module"] for call in capture.calls}
    if fn is snapkv:
        assert all("snapkv_selection" in approx_state(module) for module in modules)


def test_h2o_through_the_probe_with_softcap() -> None:
    model = tiny_model("gemma2", attn="eager")
    ids, padding = _batch()
    probe, _, _ = analysed_run(model, h2o, ids, padding)
    counted = probe.stats.queries > 0
    recall = probe.stats.means("recall")[counted]
    assert counted.any() and torch.isfinite(recall).all() and ((recall >= 0) & (recall <= 1)).all()
    assert MIN_KEYS > TOPK  # counted queries see more keys than the budget: the selection is really exercised


@pytest.mark.parametrize("fn", [h2o, snapkv])
def test_probe_starts_each_document_afresh(fn) -> None:
    """A model whose modules still hold the previous document's state gives the next document what a fresh model
    gives it: the probe empties the state at the document's prefill (a call with as many keys as queries)."""
    ids, padding = _batch()
    other = torch.randint(1, 48, ids.shape, generator=torch.Generator().manual_seed(11))
    used = tiny_model("gemma3")
    _, first, _ = analysed_run(used, fn, other, padding)
    assert any(approx_state(call["module"]) for call in first.calls)
    fresh_probe, _, _ = analysed_run(tiny_model("gemma3"), fn, ids, padding)
    used_probe, _, _ = analysed_run(used, fn, ids, padding)
    for field in ApproxStats.FIELDS:
        torch.testing.assert_close(used_probe.stats.means(field), fresh_probe.stats.means(field), equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pick_kernel_equals_the_stable_sort(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU kernel and the tensor rule name the same ids in the same order: ties (exact zeros, +inf, repeated
    pooled votes) to the more recent key, placeholders and excluded keys last."""
    torch.manual_seed(0)
    composite = torch.randint(0, 4, (3, 5, 60)).to(dtype)  # many exact ties
    composite[0, 0, 50:] = float("inf")
    composite[1, :, :20] = PLACEHOLDER
    composite[2, :, 10:40] = EXCLUDED
    composite[2, 1] = EXCLUDED  # a row that chose nothing: every id a repeat of its first
    got = pick(composite, 17)
    monkeypatch.setattr(cache_common, "numba_module", lambda name: None)
    expected = pick(composite, 17)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize(("fn", "padded"), [(h2o, True), (snapkv, True), (streaming, True), ("sparq", True),
                                            ("sparq", False), ("loki", False), ("quest", False)])  # fmt: skip
def test_reusing_the_probes_scores_changes_nothing(arch: str, fn, padded: bool, monkeypatch) -> None:
    """h2o and snapkv read the scores the probe computed for its exact reference (`chunk_logits`), only as wide as
    the chunk's last key; small chunks make that narrower than the cache. Every method reads the scores of the keys
    it picked from them (`shared_scores`); on a plainly causal chunk (no padding), sparq and loki take their top-k
    without masking their scores and quest counts each page's visible keys without reading the mask
    (`shared_causal_first`). The analysis must equal the one where each method scores
    and masks every key itself."""
    import contextlib
    import importlib

    from lm_eval_retrieval.attention import probes as probes_module
    from lm_eval_retrieval.attention._numba import numba_module

    if isinstance(fn, str):
        method_module = importlib.import_module(f"lm_eval_retrieval.attention.approx.{fn}")
        fn = getattr(method_module, fn)
        hints = []
        own_hint = method_module.shared_causal_first
        monkeypatch.setattr(method_module, "shared_causal_first", lambda *a: hints.append(own_hint(*a)) or hints[-1])
    ids, padding = _batch()
    if not padded:
        padding = torch.ones_like(padding)
    scored, read = [], []
    own_scores = common_module.masked_logits
    monkeypatch.setattr(common_module, "masked_logits", lambda *args: scored.append(1) or own_scores(*args))
    kernels = numba_module("approx._attend_scan")
    for name in ("attend_scored", "attend_scored_serial"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *args, kernel=kernel: read.append(1) or kernel(*args))
    bases = torch.linalg.qr(torch.randn(8, 64, 64, generator=torch.Generator().manual_seed(3)))[0]
    runs = []
    for share in (True, False):
        if not share:
            monkeypatch.setattr(probes_module, "sharing_chunk_logits", lambda *args: contextlib.nullcontext())
        scored.clear()
        read.clear()
        model = tiny_model(arch)
        for module in model.modules():  # loki's calibrated basis (the same random one in both runs)
            if type(module).__name__.endswith("Attention"):
                dim = module.head_dim
                module._loki_basis = torch.linalg.qr(bases[: model.config.num_key_value_heads, :dim, :dim])[0]
        probe, _, logits = analysed_run(model, fn, ids, padding, chunk_elements=2**9)
        if fn in (h2o, snapkv):
            assert bool(scored) != share  # the shared scores were used, and only where the probe shares them
        if fn is not snapkv and fn.__name__ != "quest":  # (snapkv's decode steps keep their prompt's selection,
            # outside any probe; quest scores its pages' keys in its own kernel)
            assert bool(read) == share or fn is h2o  # (h2o scores its own keys where nothing is shared)
        if share and not padded:  # plainly causal chunks, except under mistral's sliding window (a mask again)
            assert any(hint is not None for hint in hints) == (arch == "llama")
        runs.append((probe.stats, logits))
    (shared, shared_logits), (own, own_logits) = runs
    for field in ApproxStats.FIELDS:
        torch.testing.assert_close(shared.means(field), own.means(field), rtol=1e-5, atol=1e-6, equal_nan=True)
    for a, b in zip(shared_logits, own_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

