"""With the hook installed and no probe changing anything, every architecture computes exactly what it did before."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from transformers import DynamicCache

from lm_eval_retrieval.attention.hook import install_hook
from lm_eval_retrieval.errors import UserInputError
from tiny_models import ARCH_BACKENDS, VOCAB, tiny_model


class ObservingProbe:
    """Sees every call and changes nothing, so the hook's probe path is exercised too."""

    def __init__(self) -> None:
        self.layers_seen: list[int] = []

    def before(self, call):
        return None

    def after(self, call, output):
        self.layers_seen.append(call.layer)
        return None


def _prefill_and_decode(model, ids, mask, steps=4):
    """Logits of a padded prefill, then `steps` cached greedy decode steps."""
    cache = DynamicCache(config=model.config)
    out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    logits = [out.logits]
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        out = model(token, attention_mask=mask, past_key_values=cache, use_cache=True)
        logits.append(out.logits)
        token = out.logits[:, -1:].argmax(-1)
    return logits


@pytest.mark.parametrize(("arch", "base"), ARCH_BACKENDS)
def test_hook_leaves_logits_unchanged(arch: str, base: str) -> None:
    plain = tiny_model(arch, attn=base)
    hooked = copy.deepcopy(plain)
    state = install_hook(hooked, base)
    assert hooked.config._attn_implementation == f"lmr_{base}"
    assert state.num_layers == plain.config.num_hidden_layers
    torch.manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 40))  # longer than the sliding windows of Mistral and Gemma3
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding
    with torch.no_grad():
        expected = _prefill_and_decode(plain, ids, mask)
        got = _prefill_and_decode(hooked, ids, mask)
        probe = ObservingProbe()
        state.probes.append(probe)
        probed = _prefill_and_decode(hooked, ids, mask)
        state.probes.remove(probe)
    for e, g, p in zip(expected, got, probed):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)
        torch.testing.assert_close(p, e, atol=1e-5, rtol=0)
    assert sorted(set(probe.layers_seen)) == list(range(state.num_layers))


def test_seed_api_attn_is_the_exact_attention() -> None:
    """`module._attn` takes the approximation contract and returns the plain softmax attention and its top-k ids."""
    model = tiny_model("llama", attn="eager")
    install_hook(model, "eager")
    module = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 5, 16)
    k = torch.randn(1, 2, 5, 16)
    v = torch.randn(1, 2, 5, 16)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    bound = types.MethodType(module._attn, module)  # the seed idiom
    out, weights, ids = bound(q, k, v, causal, 0.25, 2)
    k_rep = k.repeat_interleave(2, dim=1)
    v_rep = v.repeat_interleave(2, dim=1)
    scores = (q @ k_rep.transpose(-1, -2) * 0.25).masked_fill(~causal, float("-inf"))
    torch.testing.assert_close(out, torch.softmax(scores, dim=-1) @ v_rep, atol=1e-6, rtol=0)
    torch.testing.assert_close(weights, torch.softmax(scores, dim=-1), atol=1e-6, rtol=0)
    assert torch.equal(ids, scores.topk(2, dim=-1).indices)


def test_unknown_base_attn_is_a_one_line_error() -> None:
    with pytest.raises(UserInputError, match="base_attn") as info:
        install_hook(tiny_model("llama"), "flashy")
    assert "\n" not in str(info.value)


def test_flash_without_cuda_says_what_to_use() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(UserInputError, match="base_attn=sdpa"):
        install_hook(tiny_model("llama"), "flash_attention_2")


def test_model_without_attention_interface_is_an_error_at_load_time() -> None:
    class NotAModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

    with pytest.raises(UserInputError, match="AttentionInterface"):
        install_hook(NotAModel(), "sdpa")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("base", ["sdpa", "eager"])
def test_hook_in_half_precision_leaves_logits_unchanged_and_probes_run(dtype: torch.dtype, base: str) -> None:
    """`dtype=bfloat16|float16`: the hook must not upcast or reorder anything the backend computes in half precision,
    and the retrieval probe must work on half-precision queries and keys."""
    from lm_eval_retrieval.attention.probes import RetrievalScoreProbe

    plain = tiny_model("llama", attn=base).to(dtype)
    hooked = copy.deepcopy(plain)
    state = install_hook(hooked, base)
    torch.manual_seed(2)
    ids = torch.randint(1, VOCAB, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        expected = _prefill_and_decode(plain, ids, mask)
        probe = RetrievalScoreProbe(state.num_layers, state.num_heads)
        state.probes.append(probe)
        got = _prefill_and_decode(hooked, ids, mask)
        state.probes.remove(probe)
    distances = probe.take_step()  # the last decode step's top-1 keys, as distances from the newest key
    assert distances.shape == (state.num_layers, state.num_heads)
    assert int(distances.min()) >= 0 and int(distances.max()) < ids.shape[1] + 4
    for e, g in zip(expected, got):
        assert g.dtype == dtype
        torch.testing.assert_close(g, e, atol=0, rtol=0)
