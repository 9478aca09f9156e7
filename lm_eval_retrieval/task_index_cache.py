"""lm-eval's index of its own bundled tasks, built once per lm-eval install instead of once per process.

Every `TaskManager()` parses all ~14,000 YAML files under `lm_eval/tasks/` to learn which names exist: about 8-10 s
of every `lm_eval` run on a laptop CPU, before the model is even loaded, and more than all the rest of a short run's
start-up. That folder only changes when lm-eval is upgraded, so the index it yields is kept in the plugin's cache
(paths.cache_root(), `lm-eval-task-index/<fingerprint>.pickle`) and read back in about half a second.

- The fingerprint is lm-eval's version plus the path, size and mtime of every file in the folder (YAMLs, their
  extensionless `include:` templates, the Python they name), so any change there, an upgrade, a reinstall or a hand
  edit, builds a fresh index; a cache file that does not load is rebuilt too.
- Only lm-eval's own folder is cached. `--include_path` folders (the user's own tasks, the plugin's) are indexed by
  lm-eval's code each time, exactly as before, and merged in the same order with the same override warning.
- `LMR_TASK_INDEX_CACHE=0` turns the cache off.

The autoload (`lm_eval_retrieval_autoload.py`) wraps `TaskIndex.build` with `cached_build_for` right after lm-eval
imports `lm_eval.tasks._index`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lm_eval_retrieval.paths import cache_root

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what is pickled changes shape
Index = dict[str, Any]
Builder = Callable[..., Index]


def enabled() -> bool:
    return os.environ.get("LMR_TASK_INDEX_CACHE", "1").strip().lower() not in {"0", "false", "no", "off"}


def folder_fingerprint(root: Path, salt: str) -> str:
    """A hash of every file's relative path, size and mtime below `root` (caches skipped), plus `salt`."""
    digest = hashlib.sha256(f"{FORMAT}|{salt}|{root}".encode())
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if name not in {"__pycache__", ".ipynb_checkpoints"})
        for name in sorted(files):
            path = os.path.join(folder, name)
            with contextlib.suppress(OSError):
                stat = os.stat(path)
                digest.update(f"{os.path.relpath(path, root)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cached_index(root: Path, build_one: Callable[[Path], Index], salt: str) -> Index:
    """`build_one(root)`, or the pickle a previous process left for the same folder contents."""
    store = Path(cache_root()) / "lm-eval-task-index" / f"{folder_fingerprint(root, salt)}.pickle"
    try:
        with open(store, "rb") as handle:
            index = pickle.load(handle)
        if isinstance(index, dict):
            return index
    except FileNotFoundError:
        pass
    except Exception as error:  # a truncated or foreign file: rebuild it
        log.info("Rebuilding lm-eval's task index cache %s (%s)", store, error)
    index = build_one(root)
    _save(store, index)
    return index


def _save(store: Path, index: Index) -> None:
    """Write atomically; a cache that cannot be written costs the next process time, never this one its result."""
    temporary = store.with_name(f"{store.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            pickle.dump(index, handle, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(temporary, store)
    except Exception as error:
        log.info("Could not cache lm-eval's task index in %s (%s)", store, error)
    finally:
        with contextlib.suppress(OSError):
            os.remove(temporary)


def cached_build_for(original: Builder, default_root: Path, version: str, index_log: logging.Logger) -> Builder:
    """`TaskIndex.build` that serves `default_root` from the cache and builds every other root with `original`.

    Roots are merged as lm-eval merges them: later roots override earlier ones, with lm-eval's warning.
    """
    default_root = Path(default_root).resolve()

    def build(paths: Iterable[Path], *, resolve_includes: bool = True) -> Index:
        paths = [Path(p) for p in paths]
        if not enabled() or not resolve_includes or default_root not in {p.resolve() for p in paths}:
            return original(paths, resolve_includes=resolve_includes)
        index: Index = {}
        for root in paths:
            if root.resolve() == default_root:
                part = cached_index(root, lambda r: original([r], resolve_includes=True), salt=version)
            else:
                part = original([root], resolve_includes=True)
            for name, entry in part.items():
                if name in index:
                    index_log.warning(
                        "Task '%s' from %s overrides existing task from %s",
                        name,
                        entry.yaml_path,
                        index[name].yaml_path,
                    )
                index[name] = entry
        return index

    build._lm_eval_retrieval = True  # type: ignore[attr-defined]
    build.__wrapped_original__ = original  # type: ignore[attr-defined]
    return build


def install(index_module: Any) -> None:
    """Wrap `index_module.TaskIndex.build` (lm_eval.tasks._index) once."""
    task_index = index_module.TaskIndex
    original = task_index.build
    if getattr(original, "_lm_eval_retrieval", False):
        return
    try:
        from importlib.metadata import version

        lm_eval_version = version("lm_eval")
    except Exception:
        lm_eval_version = "unknown"
    default_root = Path(index_module.__file__).resolve().parent
    task_index.build = staticmethod(cached_build_for(original, default_root, lm_eval_version, index_module.log))
