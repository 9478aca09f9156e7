"""The retrieval probe against the eager `output_attentions` reference, on tiny models with a planted copy pattern."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from lm_eval_retrieval.attention.hook import install_hook
from lm_eval_retrieval.attention.probes import RetrievalScoreProbe
from lm_eval_retrieval.metrics.retrieval_score import RetrievalScoreTracker
from reference_retrieval import reference_retrieval_scores
from tiny_models import ARCH_BACKENDS, VOCAB, tiny_model

STEPS = 10


@torch.no_grad()
def _greedy(model, ids: list[int], steps: int) -> list[int]:
    out = []
    for _ in range(steps):
        token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(token)
    return out


def planted_prompt(model, seed: int = 0) -> tuple[list[int], tuple[int, int]]:
    """A prompt whose answer span holds the very tokens the model goes on to generate.

    Random prefix P; the model's own greedy continuation G of P is planted inside the prompt as the span, then P's
    ending is repeated so that the model continues with (mostly) G again: the copy pattern retrieval heads detect.
    """
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randint(1, VOCAB, (30,), generator=generator).tolist()
    continuation = _greedy(model, prefix, STEPS)
    start = 12
    prompt = prefix[:start] + continuation + prefix[start:]
    return prompt, (start, start + len(continuation))


@torch.no_grad()
def probe_scores(model, state, prompt: list[int], span: tuple[int, int], steps: int) -> tuple[torch.Tensor, list[int]]:
    ids = torch.tensor(prompt)
    tracker = RetrievalScoreTracker(ids, span, state.num_layers, state.num_heads)
    probe = RetrievalScoreProbe(state.num_layers, state.num_heads)
    cache = DynamicCache(config=model.config)
    model(ids[None, :-1], past_key_values=cache, use_cache=True)
    token, position, generated = ids[None, -1:], len(prompt) - 1, []
    state.probes.append(probe)
    for _ in range(steps):
        next_token = model(token, past_key_values=cache, use_cache=True).logits[0, -1].argmax()
        tracker.update(position - probe.take_step(), next_token)
        generated.append(int(next_token))
        token, position = next_token.view(1, 1), position + 1
    state.probes.remove(probe)
    return tracker.scores(), generated


@pytest.mark.parametrize(("arch", "base"), ARCH_BACKENDS)
def test_probe_equals_eager_reference(arch: str, base: str) -> None:
    reference_model = tiny_model(arch, attn="eager", seed=3)
    hooked = copy.deepcopy(reference_model)
    if base != "eager":
        hooked.set_attn_implementation(base)
    state = install_hook(hooked, base)
    for seed in range(10):  # the first planted prompt on which the reference sees copying
        prompt, span = planted_prompt(reference_model, seed)
        expected, expected_tokens = reference_retrieval_scores(reference_model, prompt, span, STEPS)
        if any(score > 0 for row in expected for score in row):
            break
    got, got_tokens = probe_scores(hooked, state, prompt, span, STEPS)
    assert got_tokens == expected_tokens
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (got > 0).any(), "the planted copy pattern should give some head a non-zero score"
    assert float(got.max()) <= 1.0


def test_tracker_counts_each_span_position_once() -> None:
    prompt = torch.tensor([5, 6, 7, 8, 9])
    tracker = RetrievalScoreTracker(prompt, (1, 4), num_layers=1, num_heads=2)
    copy_position_2 = torch.tensor([[2, 0]])  # head 0 looks at position 2 (token 7), head 1 at position 0
    tracker.update(copy_position_2, 7)
    tracker.update(copy_position_2, 7)  # the same position copied again adds nothing
    tracker.update(torch.tensor([[3, 3]]), 9)  # wrong token: no hit
    tracker.update(torch.tensor([[4, 4]]), 9)  # right token but outside the span: no hit
    assert tracker.scores().tolist() == [[pytest.approx(1 / 3), 0.0]]


def test_translation_tracker_credits_gold_tokens_produced_while_attending_the_span() -> None:
    from lm_eval_retrieval.metrics.retrieval_score import TranslationScoreTracker

    prompt = torch.tensor([5, 6, 7, 8, 9])  # the English answer sits at positions 1..3
    gold = [40, 41, 40]  # the translated answer: token 40 appears twice
    tracker = TranslationScoreTracker(prompt, (1, 4), gold, num_layers=1, num_heads=3)
    tracker.update(torch.tensor([[2, 0, 3]]), 40)  # heads 0 and 2 look into the span while 40 is generated
    tracker.update(torch.tensor([[2, 2, 4]]), 40)  # head 0: the second 40; head 1: its first; head 2 outside span
    tracker.update(torch.tensor([[1, 1, 1]]), 99)  # not a gold token: nothing
    tracker.update(torch.tensor([[3, 0, 2]]), 41)  # heads 0 and 2
    assert tracker.scores().tolist() == [[1.0, pytest.approx(1 / 3), pytest.approx(2 / 3)]]
