"""The bundled GGUF, converted once into a plain Hugging Face folder in the user's cache.

transformers parses (and, for the weights, dequantises) a GGUF file every time anything asks for its config, its
tokenizer or its weights: about six times per `lm_eval` process for the bundled SmolLM2. The first use converts the
file into a normal model folder (config.json, model.safetensors, tokenizer files, generation_config.json) under

    $LMR_CACHE, else $XDG_CACHE_HOME/lm-eval-retrieval, else ~/.cache/lm-eval-retrieval

in `gguf/<sha256 of the GGUF>/`, so every later load, in this process or another, reads safetensors instead.

- The folder is built in a temporary sibling folder and renamed into place (atomic on one filesystem), under a
  lock file, so two processes converting at once never see half a folder.
- `manifest.json`, written last, lists every file with its size: a folder without it, or with a file missing or of
  another size, or a safetensors header that does not parse, is rebuilt. `rebuild()` is what a caller uses when
  loading the cached copy failed anyway (see models/base.py).
- The file's sha256 is remembered in `hashes.json`, keyed by path, size and mtime, so a later process does not
  re-read the 100 MB file just to find its folder.
- The weights are saved in the dtype the GGUF load gives (`dtype="auto"`, float32 for the bundled file), so a model
  loaded from the folder computes exactly the logits the GGUF load does (tests/test_aliases.py).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

from lm_eval_retrieval.paths import cache_root

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1  # bump when the folder's layout changes, so old folders are rebuilt


class NotConvertible(OSError):
    """The GGUF cannot become a plain safetensors folder; the caller loads the GGUF itself."""


def file_sha256(path: str) -> str:
    """The file's sha256, remembered in the cache by (path, size, mtime) so that it is read once per file version."""
    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    store = os.path.join(cache_root(), "hashes.json")
    try:
        with open(store, encoding="utf-8") as handle:
            known = json.load(handle)
        if isinstance(known, dict) and isinstance(known.get(key), str) and len(known[key]) == 64:
            return known[key]
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    value = digest.hexdigest()
    if len(known) >= 64:  # one entry per file version seen: keep the file small
        known = {}
    known[key] = value
    with contextlib.suppress(OSError):  # a read-only cache only costs the hash next time
        os.makedirs(cache_root(), exist_ok=True)
        _write_json_atomically(store, known)
    return value


def converted_folder(gguf_path: str) -> str:
    """A complete Hugging Face folder holding the model of `gguf_path`, converting it first if needed."""
    folder = os.path.join(cache_root(), "gguf", file_sha256(gguf_path))
    if is_complete(folder):
        return folder
    return _convert_locked(gguf_path, folder, force=False)


def rebuild(gguf_path: str) -> str:
    """Convert again even though the folder looked complete (loading it failed)."""
    folder = os.path.join(cache_root(), "gguf", file_sha256(gguf_path))
    return _convert_locked(gguf_path, folder, force=True)


def is_complete(folder: str) -> bool:
    """The manifest is there, every file it lists has its size, and each safetensors header parses."""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as handle:
            manifest = json.load(handle)
        if manifest.get("format") != FORMAT or not manifest.get("files"):
            return False
        for name, size in manifest["files"].items():
            path = os.path.join(folder, name)
            if os.path.getsize(path) != size:
                return False
            if name.endswith(".safetensors") and not _safetensors_header_ok(path, size):
                return False
        return True
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def loads_cleanly(folder: str) -> bool:
    """Whether the folder's config, tokenizer and every tensor read back: after a failed load, tells a broken cached
    copy (rebuild it) from a failure that has nothing to do with it (a bad argument: rebuilding would not help)."""
    try:
        from safetensors import safe_open
        from transformers import AutoConfig, AutoTokenizer

        AutoConfig.from_pretrained(folder)
        AutoTokenizer.from_pretrained(folder)
        for name in os.listdir(folder):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(folder, name), framework="pt") as weights:
                    for key in weights.keys():
                        weights.get_tensor(key)
        return is_complete(folder)
    except Exception:  # any failure to read it back means the copy is unusable
        return False


def _safetensors_header_ok(path: str, size: int) -> bool:
    """The header parses and the tensors it describes end exactly at the end of the file."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > size - 8:
            return False
        header = json.loads(handle.read(length))
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    return 8 + length + max(ends, default=0) == size


def _convert_locked(gguf_path: str, folder: str, force: bool) -> str:
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    with _file_lock(folder + ".lock"):
        if not force and is_complete(folder):  # another process finished it while this one waited
            return folder
        log.warning("converting %s into a Hugging Face folder at %s (once per file)", gguf_path, folder)
        building = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".tmp-", dir=parent)
        try:
            _convert(gguf_path, building)
            umask = os.umask(0o22)
            os.umask(umask)
            os.chmod(building, 0o777 & ~umask)  # mkdtemp's 0700 would hide a shared LMR_CACHE from other users
            if os.path.lexists(folder):  # a corrupt or stale copy: move it aside atomically, then delete it
                stale = f"{folder}.stale-{uuid.uuid4().hex[:8]}"
                os.rename(folder, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.rename(building, folder)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return folder


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive lock across processes (POSIX); elsewhere the atomic rename alone keeps the folder whole."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(gguf_path: str, out: str) -> None:
    """Load the GGUF the way HFLM does (dtype="auto"), save model and tokenizer as a plain folder, manifest last."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(os.path.abspath(gguf_path))
    with _metadata_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype="auto")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # transformers' legacy GGUF path dequantises every weight into a plain tensor and only keeps the quantizer as
        # a marker; its newer path may keep weights packed in GGUF blocks, which a safetensors folder cannot hold.
        packed = [name for name, param in model.state_dict().items() if not param.dtype.is_floating_point]
        if packed or getattr(quantizer, "packed_modules", None):
            raise NotConvertible(f"{gguf_path} loads with packed GGUF weights ({(packed or ['?'])[0]}), not plain tensors")
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _drop_load_flags(os.path.join(out, "tokenizer_config.json"))
    files = {}
    for entry in sorted(os.listdir(out)):
        path = os.path.join(out, entry)
        if os.path.isfile(path):
            _fsync(path)
            files[entry] = os.path.getsize(path)
    manifest = {"format": FORMAT, "source": os.path.abspath(gguf_path), "dtype": str(model.dtype), "files": files}
    _write_json_atomically(os.path.join(out, MANIFEST), manifest)


@contextlib.contextmanager
def _metadata_parsed_once() -> Iterator[None]:
    """During the conversion, the metadata-only parses of the GGUF (config, tokenizer) share one result.

    `load_gguf_checkpoint(path, return_tensors=False)` is pure in its arguments; the weights pass
    (`return_tensors=True`) still runs as transformers wrote it.
    """
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.load_gguf_checkpoint
    seen: dict[str, Any] = {}

    def load(gguf_checkpoint_path: str, return_tensors: bool = False, *args: Any, **kwargs: Any) -> Any:
        if return_tensors or args or kwargs:
            return original(gguf_checkpoint_path, return_tensors, *args, **kwargs)
        key = os.path.abspath(str(gguf_checkpoint_path))
        if key not in seen:
            seen[key] = original(gguf_checkpoint_path, return_tensors=False)
        return copy.deepcopy(seen[key])

    gguf_utils.load_gguf_checkpoint = load
    try:
        yield
    finally:
        gguf_utils.load_gguf_checkpoint = original


def _drop_load_flags(path: str) -> None:
    """How the GGUF happened to be read (offline, local) is no property of the tokenizer: keep it out of the folder."""
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, ensure_ascii=False)


def _fsync(path: str) -> None:
    with contextlib.suppress(OSError), open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _write_json_atomically(path: str, value: Any) -> None:
    temporary = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(value, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(temporary)
