"""Head masking: uniform attention or zero output on exactly the chosen heads, nothing else touched."""

from __future__ import annotations

import copy

import pytest
import torch

from lm_eval_retrieval.attention.hook import install_hook
from lm_eval_retrieval.attention.probes import HeadMask
from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.models.masking import parse_head_list, select_heads
from lm_eval_retrieval.report.heads import write_head_scores
from tiny_models import VOCAB, tiny_model


class OutputCapture:
    def __init__(self) -> None:
        self.outputs: dict[int, torch.Tensor] = {}

    def before(self, call):
        return None

    def after(self, call, output):
        self.outputs[call.layer] = output.clone()


def _run(model, probes, ids, mask, **kwargs):
    state = install_hook(model, model.config._attn_implementation.removeprefix("lmr_"))
    capture = OutputCapture()
    state.probes[:] = [*probes, capture]
    with torch.no_grad():
        out = model(ids, attention_mask=mask, **kwargs)
    state.probes[:] = []
    return out, capture.outputs


def _inputs():
    torch.manual_seed(5)
    ids = torch.randint(1, VOCAB, (2, 24))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    return ids, mask


def test_uniform_mask_makes_attention_exactly_uniform_over_visible_keys() -> None:
    model = tiny_model("llama", attn="eager")
    ids, mask = _inputs()
    out, _ = _run(model, [HeadMask({1: [2]}, "uniform")], ids, mask, output_attentions=True)
    weights = out.attentions[1][:, 2]  # (B, Q, K) of the masked head
    visible = torch.ones(2, 24, 24).tril().bool() & mask.bool()[:, None, :]
    real = mask.bool()
    expected = visible.float() / visible.sum(-1, keepdim=True).clamp_min(1)
    torch.testing.assert_close(weights[real], expected[real], atol=1e-7, rtol=0)
    other = out.attentions[1][:, 1][real]
    assert not torch.allclose(other, expected[real], atol=1e-3), "an unmasked head keeps its own attention"


@pytest.mark.parametrize("base", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["uniform", "zero"])
def test_only_the_masked_heads_change(base: str, mode: str) -> None:
    plain = tiny_model("qwen2", attn=base)
    ids, mask = _inputs()
    _, reference = _run(copy.deepcopy(plain), [], ids, mask)
    out, masked = _run(copy.deepcopy(plain), [HeadMask({1: [0, 3]}, mode)], ids, mask)
    torch.testing.assert_close(masked[0], reference[0], atol=0, rtol=0)  # layer 0 untouched, bit for bit
    assert torch.equal(masked[1][:, :, [1, 2]], reference[1][:, :, [1, 2]])  # same layer, other heads: bit for bit
    changed = (masked[1][:, :, [0, 3]] - reference[1][:, :, [0, 3]]).abs()[mask.bool()].max()
    assert changed > 1e-4
    if mode == "zero":
        assert torch.all(masked[1][:, :, [0, 3]] == 0)


def test_masking_no_heads_is_the_plain_model() -> None:
    plain = tiny_model("gemma3")
    ids, mask = _inputs()
    with torch.no_grad():
        expected = plain(ids, attention_mask=mask).logits
    out, _ = _run(copy.deepcopy(plain), [HeadMask({}, "uniform")], ids, mask)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)


def test_mask_applies_during_cached_decode() -> None:
    from transformers import DynamicCache

    model = tiny_model("llama")
    state = install_hook(model, "sdpa")
    ids = torch.randint(1, VOCAB, (1, 12))
    capture = OutputCapture()
    state.probes[:] = [HeadMask({0: [1]}, "zero"), capture]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        model(ids[:, -1:], past_key_values=cache, use_cache=True)
    assert capture.outputs[0].shape[1] == 1 and torch.all(capture.outputs[0][:, :, 1] == 0)


def _scores_file(tmp_path, layers=3, heads=4):
    # head (l, h) scores l*heads + h, so the ranking is known: 2-3, 2-2, 2-1, ...
    scores = {f"{l}-{h}": [float(l * heads + h) / 100] for l in range(layers) for h in range(heads)}
    path = tmp_path / "scores.json"
    write_head_scores(path, scores)
    return str(path)


def test_select_top_and_random_heads(tmp_path) -> None:
    path = _scores_file(tmp_path)
    assert select_heads((3, 4), mask_topk=3, head_scores=path) == [(2, 3), (2, 2), (2, 1)]
    random_a = select_heads((3, 4), mask_random=3, head_scores=path, seed=1)
    random_b = select_heads((3, 4), mask_random=3, head_scores=path, seed=1)
    assert random_a == random_b and len(set(random_a)) == 3
    assert not set(random_a) & {(2, 3), (2, 2), (2, 1)}
    assert select_heads((3, 4), mask_random=3, head_scores=path, seed=2) != random_a  # the seed matters
    assert parse_head_list("2-1,0-3;1-0", (3, 4)) == [(2, 1), (0, 3), (1, 0)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mask_heads": "3-0"}, "out of range for a model of 3 layers x 4 heads"),
        ({"mask_heads": "1:2"}, "is not <layer>-<head>"),
        ({"mask_topk": 13, "head_scores": "FILE"}, "mask_topk=13 but the model has 12 heads"),
        ({"mask_topk": 2}, "needs head_scores="),
        ({"mask_topk": 2, "head_scores": "/no/such.json"}, "/no/such.json"),
        ({"mask_random": 7, "head_scores": "FILE"}, "only 5 heads lie outside the top 7"),
        ({"mask_topk": 2, "mask_heads": "0-0"}, "give one of"),
    ],
)
def test_bad_mask_args_are_one_line_errors(tmp_path, kwargs, message) -> None:
    kwargs = {k: (_scores_file(tmp_path) if v == "FILE" else v) for k, v in kwargs.items()}
    with pytest.raises(UserInputError) as info:
        select_heads((3, 4), **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_head_score_file_of_another_model_names_both_shapes(tmp_path) -> None:
    path = _scores_file(tmp_path, layers=2, heads=2)
    with pytest.raises(UserInputError, match="2 layers x 2 heads, this model has 3 x 4"):
        select_heads((3, 4), mask_topk=1, head_scores=path)


def test_model_args_split_by_lm_eval_still_mask_every_head(tiny_model_dir, tmp_path) -> None:
    from lm_eval_retrieval.models.ret_approx import RetApproxLM

    # `--model_args mask_heads=1-0,0-1` reaches the model as mask_heads="1-0" plus a key "0-1" with no value.
    lm = RetApproxLM(pretrained=tiny_model_dir, output_path=str(tmp_path), mask_heads="1-0", **{"0-1": ""})
    assert lm.masked_heads == [(0, 1), (1, 0)]
    assert isinstance(lm.hook_state.probes[0], HeadMask) and lm.get_model_info()["masked_heads"]["mode"] == "uniform"
