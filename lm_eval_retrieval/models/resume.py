"""`--use_cache PATH` for models whose result is more than the response text.

lm-eval's `CachingLM` keeps one response string per request and, on a second run, never shows the cached requests to
the model. That is right for `hf`, wrong here: a cached NIAH answer without its head scores would silently drop that
document from the head-score file. So our models take the three request methods back from the `CachingLM` (every
request reaches the model again) and keep, in their own table of the same SQLite file, what they need to skip the
work: for detection the response *and* the document's head scores, committed as each document finishes, so a killed
run loses at most the document it was on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)

REQUEST_METHODS = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def take_over_from_caching_lm(lm: Any, caller_depth: int = 2) -> bool:
    """Called from `lm.set_cache_hook`: route the calling `CachingLM`'s request methods straight to `lm`.

    `CachingLM.__init__` is the only caller that passes a hook with a database; it is found on the call stack
    (`caller_depth` frames up) and given instance attributes that shadow its `__getattr__` wrapper. Returns whether
    a `CachingLM` was found."""
    from lm_eval.api.model import CachingLM

    frame = sys._getframe(caller_depth)
    caching = frame.f_locals.get("self")
    if not isinstance(caching, CachingLM) or caching.lm is not lm:
        return False
    for method in REQUEST_METHODS:
        setattr(caching, method, getattr(lm, method))
    return True


class ResultStore:
    """Finished per-request results in a table of lm-eval's cache file, keyed by request and model fingerprint."""

    def __init__(self, cache_file: str, table: str) -> None:
        from sqlitedict import SqliteDict

        self.path = cache_file
        self.db = SqliteDict(cache_file, tablename=table, autocommit=True)

    @staticmethod
    def key(method: str, args: tuple, fingerprint: dict[str, Any]) -> str:
        """lm-eval's own request identity plus everything about the model that changes the result (masking...)."""
        payload = json.dumps([method, list(args), fingerprint], sort_keys=True, default=str)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def get(self, key: str) -> Any | None:
        return self.db.get(key)

    def put(self, key: str, value: Any) -> None:
        self.db[key] = value
        self.db.commit()

    def __len__(self) -> int:
        return len(self.db)
