"""`quantize=4bit|8bit` through bitsandbytes (>= 0.50 runs on CPU too): the hooked quantised model computes what the
unhooked quantised model computes, and combinations that cannot work are one-line errors."""

from __future__ import annotations

import pytest
import torch

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.models.head_trace import RetrievalHeadLM
from lm_eval_retrieval.models.quantize import quantization_config

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize(("mode", "layer_class"), [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_model_loads_hooked_and_matches_the_unhooked_quantized_model(tiny_model_dir, mode, layer_class):
    lm = RetrievalHeadLM(pretrained=tiny_model_dir, quantize=mode, dtype="float32")
    assert type(lm.model.model.layers[0].self_attn.q_proj).__name__ == layer_class
    ids = torch.tensor([[5, 17, 99, 3, 250, 8, 41]])
    with torch.no_grad():
        hooked = lm.model(ids).logits
        implementation = lm.model.config._attn_implementation
        lm.model.set_attn_implementation("sdpa")
        try:
            plain = lm.model(ids).logits
        finally:
            lm.model.set_attn_implementation(implementation)
    assert implementation.startswith("lmr_")
    torch.testing.assert_close(hooked, plain, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("mode", "gguf", "message"),
    [
        ("3bit", None, "use quantize=4bit or quantize=8bit"),
        ("4bit", "model.gguf", "does not apply to a GGUF model"),
    ],
)
def test_impossible_quantization_is_a_one_line_error(mode, gguf, message):
    with pytest.raises(UserInputError, match=message):
        quantization_config(mode, gguf)
