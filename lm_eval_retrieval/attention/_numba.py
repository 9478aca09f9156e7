"""Where the numba kernels come from: one loader for every `_*_scan.py` module, so that a machine without numba
falls back to the torch paths in one place."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.cache
def numba_module(name: str) -> ModuleType | None:
    """`lm_eval_retrieval.attention.<name>` (e.g. "approx._simhash_scan") compiled by numba (on first use, cached on disk), or None where numba
    cannot be imported."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError:
        return None
