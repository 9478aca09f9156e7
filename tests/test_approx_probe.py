"""Recall@k, error norm and top-k masses of the approximation probe against the fp64 reference."""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch
from transformers import DynamicCache

from lm_eval_retrieval.attention.approx import exact_attention, exact_topk, simhash
from lm_eval_retrieval.attention.hook import install_hook
from lm_eval_retrieval.attention.probes import SCORE_WIDTH_ALIGN, ApproxProbe, aligned_chunks
from lm_eval_retrieval.errors import UserInputError
from reference_approx import FIELDS, reference_stats
from tiny_models import ARCH_BACKENDS, VOCAB, tiny_model

TOPK, MIN_KEYS = 3, 6


class CaptureProbe:
    """Keeps a copy of every call's inputs for the reference."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.step = 0

    def before(self, call):
        return None

    def after(self, call, output):
        self.calls.append(
            dict(layer=call.layer, module=call.module, query=call.query.clone(), key=call.key.clone(),
                 value=call.value.clone(), scaling=call.scaling, step=self.step)
        )


def windows_of(model) -> list[int | None]:
    config = model.config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [window if kind == "sliding_attention" else None for kind in layer_types]
    return [window] * config.num_hidden_layers


def analysed_run(
    model, approx_fn, ids, padding, layerwise=True, decode=True, topk=TOPK, chunk_elements=2**23, prefix=0
):
    """Prefill a left-padded batch (its first `prefix` tokens in a call of their own, the rest against their cached
    keys), then one cached decode step; returns (probe, capture, logits). Capture steps count the calls."""
    state = install_hook(model, "sdpa" if model.config._attn_implementation == "sdpa" else "eager")
    for name, module in model.named_modules():
        if name in state.module_names:
            module._approx_attn = types.MethodType(approx_fn, module)
    capture = CaptureProbe()
    probe = ApproxProbe(
        state.num_layers, state.num_heads, topk, layerwise=layerwise, min_visible_keys=MIN_KEYS,
        chunk_elements=chunk_elements,
    )  # fmt: skip
    state.probes[:] = [capture, probe]
    cache = DynamicCache(config=model.config)
    logits = []
    with torch.no_grad():
        if prefix:
            out = model(ids[:, :prefix], attention_mask=padding[:, :prefix], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
            capture.step = 1
        out = model(
            ids[:, prefix:], attention_mask=padding[:, : ids.shape[1]], past_key_values=cache, use_cache=True
        )
        logits.append(out.logits)
        if decode:
            capture.step += 1
            token = out.logits[:, -1:].argmax(-1)
            out = model(token, attention_mask=padding, past_key_values=cache, use_cache=True)
            logits.append(out.logits)
    state.probes[:] = []
    return probe, capture, logits


def _batch(length: int = 40):
    torch.manual_seed(7)
    ids = torch.randint(1, VOCAB, (2, length))
    padding = torch.ones(2, length + 1, dtype=torch.long)
    padding[0, :9] = 0  # left padding
    return ids, padding


def assert_matches_reference(probe, capture, model, padding, total_lengths, approx_fn=None, topk=TOPK):
    # Gemma2 soft-caps its attention logits; Gemma3 has the config field but does not pass it to attention.
    softcap = model.config.attn_logit_softcapping if model.config.model_type == "gemma2" else None
    expected, counts = reference_stats(
        capture.calls, padding, total_lengths, windows_of(model), topk, MIN_KEYS, approx_fn, softcap
    )
    stats = probe.stats
    assert counts, "the reference must count some queries"
    for (layer, head), count in counts.items():
        assert stats.queries[layer, head] == count, (layer, head)
    assert int(stats.queries.sum()) == sum(counts.values())
    for field in FIELDS:
        got = stats.means(field)
        for (layer, head), value in expected[field].items():
            assert abs(float(got[layer, head]) - value) < 1e-6, (field, layer, head, float(got[layer, head]), value)


@pytest.mark.parametrize(("arch", "base"), ARCH_BACKENDS)
def test_exact_topk_matches_reference_with_padding_and_decode(arch: str, base: str) -> None:
    model = tiny_model(arch, attn=base)
    ids, padding = _batch()
    probe, capture, _ = analysed_run(model, exact_topk, ids, padding)
    assert_matches_reference(probe, capture, model, padding, [ids.shape[1], ids.shape[1] + 1])
    assert torch.all(probe.stats.means("recall")[probe.stats.queries > 0] == 1.0)
    assert torch.all(probe.stats.means("error_norm")[probe.stats.queries > 0] > 0)


@pytest.mark.parametrize(
    ("q_len", "first_query_key", "chunk"), [(1000, 0, 227), (1000, 37, 100), (50, 3, 64), (300, 5, 20), (300, 5, 10)],
)
def test_aligned_chunks_cover_every_query_once_and_end_on_aligned_keys(q_len, first_query_key, chunk) -> None:
    bounds = aligned_chunks(q_len, first_query_key, chunk)
    assert bounds[0][0] == 0 and bounds[-1][1] == q_len
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(0 < end - start <= chunk for start, end in bounds)
    if chunk >= SCORE_WIDTH_ALIGN:  # every chunk but the last ends on a multiple of 16 keys
        assert all((first_query_key + end) % SCORE_WIDTH_ALIGN == 0 for _, end in bounds[:-1])
        assert all(end - start > chunk - SCORE_WIDTH_ALIGN for start, end in bounds[:-1])
    else:  # a few rows per chunk: cut where they fall
        assert all(end - start == chunk for start, end in bounds[:-1])


@pytest.mark.parametrize(("approx_fn", "padded"), [(exact_topk, True), (exact_topk, False), (simhash, False)])
def test_long_chunks_after_cached_keys_match_the_reference(approx_fn, padded: bool) -> None:
    """Chunks of 64 queries (each ends on a multiple of 16 keys) in a call that follows 21 cached keys, with left
    padding (the masked path) and without (the causal path), against the fp64 reference."""
    model = tiny_model("llama")
    ids, padding = _batch(length=120)
    if not padded:
        padding[:] = 1
    heads = model.config.num_attention_heads
    chunk_elements = 2 * heads * ids.shape[1] * 64 + heads  # 64 queries per chunk of the second call
    probe, capture, _ = analysed_run(model, approx_fn, ids, padding, chunk_elements=chunk_elements, prefix=21)
    assert any(call["query"].shape[2] == 120 - 21 for call in capture.calls)
    assert_matches_reference(
        probe, capture, model, padding, [21, ids.shape[1], ids.shape[1] + 1],
        approx_fn=None if approx_fn is exact_topk else approx_fn,
    )


@pytest.mark.parametrize("approx_fn", [exact_topk, simhash])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: sliding-window layers see fewer keys, so fewer k
def test_a_share_budget_gives_each_query_its_own_k(arch: str, approx_fn) -> None:  # type: ignore[no-untyped-def]
    """topk=20%: a query that sees v keys gets ceil(0.2 v), through prefill chunks and a decode step."""
    model = tiny_model(arch)
    ids, padding = _batch()
    ids, padding = ids[1:], padding[1:]  # one sequence: a share is set per query from the keys it sees
    # Chunks of a few queries each: runs of equal k are cut inside chunks and across their edges.
    probe, capture, _ = analysed_run(model, approx_fn, ids, padding, topk="20%", chunk_elements=4 * 40 * 7)
    share = lambda visible: max(1, math.ceil(0.2 * visible))  # noqa: E731
    lengths = [ids.shape[1], ids.shape[1] + 1]
    reference_fn = None if approx_fn is exact_topk else approx_fn
    assert_matches_reference(probe, capture, model, padding, lengths, approx_fn=reference_fn, topk=share)
    assert probe.topk == "20%" and probe.min_visible_keys == MIN_KEYS


def test_a_share_budget_refuses_a_padded_batch() -> None:
    model = tiny_model("llama")
    ids, padding = _batch()
    with pytest.raises(UserInputError, match="batch_size=1"):
        analysed_run(model, exact_topk, ids, padding, topk="20%")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_simhash_matches_reference_and_misses_some_keys(arch: str) -> None:
    model = tiny_model(arch)
    ids, padding = _batch()
    probe, capture, _ = analysed_run(model, simhash, ids, padding)
    assert_matches_reference(probe, capture, model, padding, [ids.shape[1], ids.shape[1] + 1], approx_fn=simhash)
    recall = probe.stats.means("recall")
    assert float(recall.nanmean()) < 0.95, "an LSH retriever is genuinely approximate"


def test_padding_is_neither_key_nor_query() -> None:
    model = tiny_model("llama")
    ids, padding = _batch()
    probe, _, _ = analysed_run(model, exact_topk, ids, padding, decode=False)
    real_queries = int(padding[:, :40].sum())
    # Query q (0-based, among real tokens) sees q + 1 keys; it counts from the MIN_KEYS-th real token on.
    per_row = [int(row.sum()) - (MIN_KEYS - 1) for row in padding[:, :40]]
    assert int(probe.stats.queries[0, 0]) == sum(per_row) < real_queries


def test_k_at_least_all_keys_gives_zero_error() -> None:
    model = tiny_model("qwen2")
    state = install_hook(model, "sdpa")
    for name, module in model.named_modules():
        if name in state.module_names:
            module._approx_attn = types.MethodType(exact_topk, module)
    probe = ApproxProbe(state.num_layers, state.num_heads, topk=64, min_visible_keys=1)
    state.probes.append(probe)
    with torch.no_grad():
        model(torch.randint(1, VOCAB, (1, 30)))
    counted = probe.stats.queries > 0
    assert counted.all()
    assert torch.all(probe.stats.means("error_norm")[counted] < 1e-6)
    assert torch.all(probe.stats.means("recall")[counted] == 1.0)


def test_layerwise_keeps_logits_and_end_to_end_moves_them() -> None:
    plain = tiny_model("llama")
    ids, padding = _batch()
    with torch.no_grad():
        expected = plain(ids, attention_mask=padding[:, :40]).logits
    _, _, layerwise = analysed_run(copy.deepcopy(plain), simhash, ids, padding, layerwise=True, decode=False)
    torch.testing.assert_close(layerwise[0], expected, atol=1e-5, rtol=0)
    _, _, end_to_end = analysed_run(copy.deepcopy(plain), simhash, ids, padding, layerwise=False, decode=False)
    real = padding[:, :40].bool()
    assert (end_to_end[0] - expected)[real].abs().max() > 1e-3


@pytest.mark.parametrize(("arch", "base"), ARCH_BACKENDS)
def test_analysis_keeps_every_architectures_logits(arch: str, base: str) -> None:
    """Over sdpa in float32 the probe computes the exact output itself (sdpa's CPU kernel, which also returns the
    softmax normaliser): logits must still equal the unpatched model's, prefill and cached decode, with padding."""
    plain = tiny_model(arch, attn=base)
    ids, padding = _batch()
    with torch.no_grad():
        expected = plain(ids, attention_mask=padding[:, :40]).logits
    _, _, got = analysed_run(copy.deepcopy(plain), exact_topk, ids, padding, decode=False)
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=0)


def test_seed_idiom_exact_attention_as_approximation() -> None:
    """`module._approx_attn = MethodType(module._attn, module)` with `_attn` the exact attention: recall 1, error 0."""
    model = tiny_model("llama")
    ids, padding = _batch()
    probe, _, _ = analysed_run(model, exact_attention, ids, padding)
    counted = probe.stats.queries > 0
    assert torch.all(probe.stats.means("recall")[counted] == 1.0)
    assert torch.all(probe.stats.means("error_norm")[counted] < 1e-6)


def test_a_bad_approximation_has_recall_near_k_over_l() -> None:
    def first_keys(module, query, key, value, attention_mask, scaling, topk):
        ids = torch.arange(topk).expand(*query.shape[:3], topk)
        return exact_topk(module, query, key, value, attention_mask, scaling, topk)[0], None, ids

    model = tiny_model("llama")
    torch.manual_seed(3)
    ids = torch.randint(1, VOCAB, (1, 200))
    probe, _, _ = analysed_run(model, first_keys, ids, torch.ones(1, 201, dtype=torch.long), decode=False)
    recall = float(probe.stats.means("recall").mean())
    # Queries with L visible keys hit the first k keys by chance about k/L of the time: ~ 0.02-0.2 here.
    assert recall < 0.25


def test_wrong_shapes_name_the_function() -> None:
    def broken(module, query, key, value, attention_mask, scaling, topk):
        return query[:, :, :, :2], None, torch.zeros(1, dtype=torch.long)

    model = tiny_model("llama")
    ids, padding = _batch()
    with pytest.raises(UserInputError, match=r"approx function .* returned approx_output of shape \(2, 4, 40, 2\)"):
        analysed_run(model, broken, ids, padding)


def test_missing_scaling_defaults_to_one_over_sqrt_d() -> None:
    from lm_eval_retrieval.attention.hook import hooked_attention

    model = tiny_model("llama", attn="eager")
    state = install_hook(model, "eager")
    capture = CaptureProbe()
    state.probes.append(capture)
    module = model.model.layers[0].self_attn
    q, k, v = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    hooked_attention(module, q, k, v, None, scaling=None)
    assert capture.calls[0]["scaling"] == pytest.approx(16**-0.5)


def test_chunk_masks_are_causal_and_shared_within_a_forward() -> None:
    """The causal masks handed to approximations: query i of a chunk sees keys 0..first + i, whatever order the
    layers ask in, whatever the cache kept (a tiny budget keeps only the first), and a new number of keys (the next
    forward) never gets an old one."""
    from lm_eval_retrieval.attention.probes import _CausalMasks

    masks = _CausalMasks(budget_bytes=2 * 5 * 12)
    device = torch.device("cpu")
    for k_len, chunks in ((12, [(2, 5), (7, 5), (0, 2)]), (13, [(12, 1), (2, 5)]), (12, [(7, 5), (2, 5)])):
        for _layer in range(3):
            for first, size in chunks:
                got = masks(first, size, k_len, device)
                own = torch.arange(first, first + size)[:, None]
                assert torch.equal(got[0, 0], torch.arange(k_len)[None, :] <= own)
    assert masks(7, 5, 12, device) is masks(7, 5, 12, device), "kept masks are shared, not rebuilt"
