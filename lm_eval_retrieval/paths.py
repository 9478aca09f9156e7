"""Where the bundled tasks are: below both the CLI and the masking sweep, so neither imports the other for it."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def tasks_dir() -> str:
    """Folder of the bundled task YAMLs: the installed package's copy, else `tasks/` of the source checkout.

    `pip install .` puts the repository's `tasks/` into the wheel as the package `lm_eval_retrieval.tasks` (setup.cfg
    maps one onto the other); a source checkout (or an editable install) has it at the repository root only.
    """
    installed = _PACKAGE / "tasks"
    if installed.is_dir():
        return str(installed)
    return str(_PACKAGE.parent / "tasks")


def cache_root() -> str:
    """The plugin's cache: $LMR_CACHE, else $XDG_CACHE_HOME/lm-eval-retrieval, else ~/.cache/lm-eval-retrieval.

    Converted models (models/gguf_cache.py) and lm-eval's task index (task_index_cache.py) live here, never in the
    repository.
    """
    if os.environ.get("LMR_CACHE"):
        return os.path.abspath(os.path.expanduser(os.environ["LMR_CACHE"]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "lm-eval-retrieval")
