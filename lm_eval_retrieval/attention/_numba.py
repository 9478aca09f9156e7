"""Where the numba kernels come from: one loader for every `_*_scan.py` module, so that a machine without numba
falls back to the torch paths in one place.

A convention every kernel module keeps: a helper that needs fastmath flags (a dot product summed in any order, a
polynomial contracted to fused multiply-adds) is a plain `@numba.njit(fastmath=...)`, never `inline="always"`.
numba inlines an `inline="always"` function into its caller's IR, which is then compiled with the caller's flags:
the helper's own are dropped, and its loops run one scalar at a time (key scoring 2.5x slower, h2o's softmax
a third slower). LLVM still inlines the plain function, keeping the flags on its instructions.

numba's disk cache (`cache=True`) is not invalidated by an edit to a helper a kernel imports from another module:
after changing one, measure or test with a fresh `NUMBA_CACHE_DIR` (a clean clone or `pip install` is fresh)."""

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
