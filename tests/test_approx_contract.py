"""The approximation contract's extras: parameters (`approx_args=`), the per-sequence state and its reset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lm_eval_retrieval.attention.approx import exact_topk, simhash
from lm_eval_retrieval.attention.approx.contract import (
    approx_args,
    approx_state,
    method,
    parse_approx_args,
    sequence_tokens,
    set_approx_args,
)
from lm_eval_retrieval.attention.hook import AttentionCall
from lm_eval_retrieval.attention.probes import token_keys
from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.models.ret_approx import RetApproxLM
from test_approx_probe import _batch, analysed_run
from tiny_models import VOCAB, tiny_model


@method(page_size=16, ratio=0.5, exact=False, note="x")
def toy(module, query, key, value, attention_mask, scaling, topk):  # type: ignore[no-untyped-def]
    return exact_topk(module, query, key, value, attention_mask, scaling, topk)


def test_parse_types_and_defaults() -> None:
    parsed = parse_approx_args("page_size:32; ratio:0.25;exact:true;note:y", toy, "toy")
    assert parsed == {"page_size": 32, "ratio": 0.25, "exact": True, "note": "y"}
    module = torch.nn.Module()
    set_approx_args(module, {"page_size": 8})
    assert approx_args(module, toy) == {"page_size": 8, "ratio": 0.5, "exact": False, "note": "x"}
    assert approx_args(torch.nn.Module(), simhash) == {"bits": 16}


@pytest.mark.parametrize(
    "text, message",
    [
        ("pages:4", "approx=toy has no parameter 'pages'; its parameters: page_size (default 16), ratio (default 0.5)"),
        ("page_size=4", "approx_args item 'page_size=4' is not name:value"),
        ("page_size:big", "approx=toy parameter page_size must be a int (default 16), got 'big'"),
        ("exact:maybe", "approx=toy parameter exact must be a bool"),
    ],
)
def test_bad_approx_args_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(UserInputError) as error:
        parse_approx_args(text, toy, "toy")
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_method_without_parameters_refuses_any() -> None:
    with pytest.raises(UserInputError, match="approx=exact_topk has no parameter 'bits'; its parameters: none"):
        parse_approx_args("bits:8", exact_topk, "exact_topk")


def test_model_arg_reaches_every_layer_and_the_results(tiny_model_dir: str, tmp_path: Path) -> None:
    lm = RetApproxLM(pretrained=tiny_model_dir, output_path=str(tmp_path), dtype="float32", topk=2,
                     approx="simhash", approx_args="bits:8")  # fmt: skip
    modules = lm.attention_modules()
    assert modules and all(approx_args(m, simhash) == {"bits": 8} for m in modules)
    assert lm.recall_stats()["approx_args"] == {"bits": 8}


def test_unknown_approx_arg_fails_before_the_model_loads(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="approx=simhash has no parameter 'rank'; its parameters: bits"):
        RetApproxLM(pretrained=str(tmp_path / "no-such-model"), approx="simhash", approx_args="rank:4")


def counting(module, query, key, value, attention_mask, scaling, topk):  # type: ignore[no-untyped-def]
    """Counts the query rows it has seen in this sequence, in the per-sequence state."""
    state = approx_state(module)
    state["rows"] = state.get("rows", 0) + query.shape[2]
    module._rows_log.append(state["rows"])
    return exact_topk(module, query, key, value, attention_mask, scaling, topk)


def test_state_lives_through_decoding_and_resets_at_a_new_sequence() -> None:
    model = tiny_model("llama")
    ids, padding = _batch(24)
    modules = [m for m in model.modules() if hasattr(m, "q_proj")]
    for module in modules:
        module._rows_log = []
    analysed_run(model, counting, ids, padding)  # prefill of 24 rows, then one decode step
    analysed_run(model, counting, ids, padding)  # a second document: starts from nothing again
    for module in modules:
        assert module._rows_log == [24, 25, 24, 25]


@pytest.mark.parametrize("approx_fn", [exact_topk, simhash])
def test_cost_is_the_share_of_visible_keys(approx_fn) -> None:  # type: ignore[no-untyped-def]
    """attended = distinct visible keys the output uses / visible keys; scanned = the reported work / visible keys,
    averaged over the counted queries (prefill rows with at least MIN_KEYS keys, and the decode row)."""
    from test_approx_probe import MIN_KEYS, TOPK

    model = tiny_model("llama")
    length = 30
    ids = torch.randint(1, VOCAB, (1, length), generator=torch.Generator().manual_seed(3))
    padding = torch.ones(1, length + 1, dtype=torch.long)
    probe, _, _ = analysed_run(model, approx_fn, ids, padding)
    visible = torch.tensor([v for v in range(1, length + 1) if v >= MIN_KEYS] + [length + 1], dtype=torch.float64)
    dim = model.config.hidden_size // model.config.num_attention_heads
    expected_attended = (visible.clamp(max=TOPK) / visible).mean()
    if approx_fn is exact_topk:
        expected_scanned = torch.tensor(1.0, dtype=torch.float64)
    else:
        expected_scanned = ((visible * 16 / dim + TOPK) / visible).mean()
    stats = probe.stats
    torch.testing.assert_close(stats.means("scanned"), torch.full_like(stats.means("scanned"), float(expected_scanned)))
    attended = stats.means("attended")  # both pick min(k, visible) distinct visible keys
    torch.testing.assert_close(attended, torch.full_like(attended, float(expected_attended)))


def recording_tokens(module, query, key, value, attention_mask, scaling, topk):  # type: ignore[no-untyped-def]
    if query.shape[2] > 1:  # a prompt chunk
        module._tokens_log = getattr(module, "_tokens_log", []) + [sequence_tokens(module, attention_mask).clone()]
    return exact_topk(module, query, key, value, attention_mask, scaling, topk)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_probe_records_which_prompt_keys_are_tokens(arch: str) -> None:
    """Every chunk of a left-padded prompt, the first included, learns the whole prompt's tokens (the padding
    mask), though its own rows see only the keys up to their own."""
    model = tiny_model(arch)
    ids, padding = _batch(24)
    analysed_run(model, recording_tokens, ids, padding, chunk_elements=2 * 4 * 24 * 6)  # chunks of 6 queries
    modules = [m for m in model.modules() if hasattr(m, "_tokens_log")]
    assert modules
    for module in modules:
        assert len(module._tokens_log) >= 4
        for tokens in module._tokens_log:
            assert torch.equal(tokens, padding[:, :24].bool())


def _call(mask: torch.Tensor) -> AttentionCall:
    batch, k_len = mask.shape[0], mask.shape[-1]
    return AttentionCall(torch.nn.Module(), 0, torch.zeros(batch, 2, k_len, 4), torch.zeros(batch, 1, k_len, 4),
                         torch.zeros(batch, 1, k_len, 4), mask, 1.0, {})  # fmt: skip


def test_token_keys_read_padding_from_any_mask() -> None:
    """Left padding whose rows see nothing, left padding whose rows a backend unmasked (they see every key), right
    padding, and the same as an additive float mask: the tokens are the real positions."""
    length = 6
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    real = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    mask = (causal & real[:, None, :])[:, None].clone()
    mask[1, 0, 0] = True  # an unmasked padding row
    assert torch.equal(token_keys(_call(mask)), real)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert torch.equal(token_keys(_call(additive)), real)
    plain = AttentionCall(torch.nn.Module(), 0, torch.zeros(2, 2, 4, 4), torch.zeros(2, 1, 4, 4),
                          torch.zeros(2, 1, 4, 4), None, 1.0, {})  # fmt: skip
    assert torch.equal(token_keys(plain), torch.ones(2, 4, dtype=torch.bool))
