"""lm-eval-retrieval: where a language model finds things in long context.

Importing the package registers its models with lm-eval (lazily) and imports no torch; the model classes load on
first attribute access.
"""

from __future__ import annotations

import logging
from typing import Any

import lm_eval_retrieval_autoload  # noqa: F401  (registration when lm-eval's registry is imported)

# Our log lines (documents counted, resumed, reports written) go where lm-eval's own go, at lm-eval's verbosity.
logging.getLogger("lm_eval_retrieval").parent = logging.getLogger("lm_eval")

__version__ = "0.1.0"

_LAZY = {
    "RetrievalHeadLM": "lm_eval_retrieval.models.head_trace",
    "RetApproxLM": "lm_eval_retrieval.models.ret_approx",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lm_eval_retrieval' has no attribute {name!r}")
