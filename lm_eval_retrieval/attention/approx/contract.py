"""What an approximation may use beyond the seed's call signature: its parameters, a per-sequence state, its cost.

The call stays the seed's, `fn(module, query, key, value, attention_mask, scaling, topk) -> (output, scores | None,
ids)`, so a plain function keeps working unchanged. A built-in method additionally

- declares its parameters and their defaults with `@method(page_size=16, ...)`; a user sets them with the model arg
  `approx_args=page_size:32;rank:16` (semicolons: lm-eval splits model_args on commas), which `parse_approx_args`
  checks against the declared names and types, and the method reads them with `approx_args(module, fn)`;
- keeps what must survive from one call to the next of the same sequence (H2O's accumulated scores, SnapKV's
  selection, Quest's page summaries, an ANN index) in `approx_state(module)`, a dict per attention module that the
  probe empties whenever a call starts a new sequence (a call with no cached keys: as many keys as queries), so
  nothing leaks from one document into the next; `sequence_tokens(module, visible)` says which keys of that first
  call are tokens rather than padding (the probe, which sees the call's whole mask, records them: a method sees only
  its chunk's rows, which do not reach the later keys of the prompt);
- reports the work it spent choosing its keys with `report_scanned(module, scanned)`, in key-vector equivalents per
  query (scoring one key against the query with its full vector = 1).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ...errors import UserInputError

ApproxFn = Callable[..., tuple]


def method(**defaults: Any) -> Callable[[ApproxFn], ApproxFn]:
    """Declare a built-in's parameters (name -> default); the default's type is the type a user's value must have."""

    def declare(fn: ApproxFn) -> ApproxFn:
        fn.params = dict(defaults)  # type: ignore[attr-defined]
        return fn

    return declare


def declared_params(fn: ApproxFn) -> dict[str, Any]:
    return dict(getattr(getattr(fn, "__func__", fn), "params", {}))


def parse_approx_args(text: str | dict | None, fn: ApproxFn, name: str) -> dict[str, Any]:
    """`page_size:16;rank:32` -> {"page_size": 16, "rank": 32}, checked against `fn`'s declared parameters."""
    if not text:
        return {}
    declared = declared_params(fn)
    if isinstance(text, dict):
        pairs = list(text.items())
    else:
        pairs = []
        for item in filter(None, (part.strip() for part in str(text).split(";"))):
            key, colon, value = item.partition(":")
            if not colon:
                raise UserInputError(f"approx_args item {item!r} is not name:value; write e.g. approx_args=bits:16")
            pairs.append((key.strip(), value.strip()))
    parsed = {}
    for key, value in pairs:
        if key not in declared:
            own = ", ".join(f"{k} (default {v})" for k, v in declared.items()) or "none"
            raise UserInputError(f"approx={name} has no parameter {key!r}; its parameters: {own}")
        parsed[key] = _typed(value, declared[key], name, key)
    return parsed


def _typed(value: Any, default: Any, name: str, key: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        if isinstance(default, bool):
            if value.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(value)
            return value.lower() in {"true", "1", "yes"}
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise UserInputError(
            f"approx={name} parameter {key} must be a {type(default).__name__} (default {default}), got {value!r}"
        ) from None
    return value


def approx_args(module: torch.nn.Module, fn: ApproxFn) -> dict[str, Any]:
    """`fn`'s parameters for this module: the declared defaults, overridden by the run's `approx_args`."""
    return {**declared_params(fn), **getattr(module, "_approx_args", {})}


def set_approx_args(module: torch.nn.Module, values: dict[str, Any]) -> None:
    module._approx_args = dict(values)


def approx_state(module: torch.nn.Module) -> dict[str, Any]:
    """The module's per-sequence state (see the module docstring); empty at the start of every sequence."""
    state = module.__dict__.get("_approx_state")
    if state is None:
        state = module.__dict__["_approx_state"] = {}
    return state


def reset_state(module: torch.nn.Module, tokens: torch.Tensor | None = None) -> None:
    """Start a new sequence: an empty state, and, where the caller knows them, which keys of its first call are tokens
    (bool (B, K), see `sequence_tokens`)."""
    module.__dict__["_approx_state"] = {}
    module.__dict__["_approx_tokens"] = tokens


def sequence_tokens(module: torch.nn.Module, visible: torch.Tensor) -> torch.Tensor:
    """Bool (B, K): which keys of the sequence's first call are tokens, not padding, as the probe recorded them at
    `reset_state`; without a record that fits (a direct call), the keys some row of this call's mask `visible`
    (B, 1 or Hq, Q, K) sees. A method that summarises the whole prompt once (MagicPIG's key centre) needs this: the
    probe hands a method one chunk of queries at a time, and the first chunk's rows do not see the prompt's later
    keys."""
    tokens = module.__dict__.get("_approx_tokens")
    if tokens is not None and tokens.shape == (visible.shape[0], visible.shape[-1]):
        return tokens.to(visible.device)
    return visible.any(-2).any(1)


def report_scanned(module: torch.nn.Module, scanned: torch.Tensor | float) -> None:
    """Key-vector equivalents spent choosing each query's keys: (B, Hq, Q) or one number for every query."""
    module.__dict__["_approx_scanned"] = scanned


def take_scanned(module: torch.nn.Module) -> torch.Tensor | float | None:
    """What the last call reported (None: it reported nothing), cleared for the next call."""
    return module.__dict__.pop("_approx_scanned", None)
