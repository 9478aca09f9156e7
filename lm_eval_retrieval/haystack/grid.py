"""The NIAH grid behind the tasks: context lengths x depths x needles, read from lm-eval's `--metadata`.

lm-eval hands a `custom_dataset` function the model args and the `--metadata` JSON merged into one dict, so the
task cannot tell a model arg from a misspelt grid key. The `--metadata` JSON is therefore read again from the
command line and checked key by key; a key the grid does not know is an error that lists the ones it does.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from ..errors import UserInputError
from ..run_config import load_run_config

log = logging.getLogger(__name__)

# The original detector: 1k-50k tokens in 20 steps, needle depth 0-100% in 10 steps.
DEFAULT_CONTEXT_LENGTHS = [round(1000 + i * (50000 - 1000) / 19) for i in range(20)]
DEFAULT_DEPTHS = [round(i * 100 / 9, 1) for i in range(10)]
GENERATION_ROOM = 64  # tokens kept free for the answer when capping lengths at the model's maximum

TASK_KEYS = {
    "context_lengths": "list of prompt lengths in model tokens",
    "depths": "list of needle depths in percent (0 = start, 100 = end)",
    "needles_per_cell": "how many needles per (length, depth) cell (default 1, rotating through the needles)",
    "haystack": "'auto' (real prose) or 'noise' (RULER-style repeated sentences)",
    "haystack_path": "a .txt or .jsonl (field 'text') file of your own",
    "language": "language of needle and question",
    "haystack_language": "language of the haystack",
    "answer_language": "language the model answers in",
    "chat_template": "wrap the prompt in the tokenizer's chat template (default true)",
    "needle_seed": "seed for needle order",
    "tokenizer": "tokenizer to size documents with (defaults to pretrained)",
}


@dataclass
class GridSpec:
    context_lengths: list[int]
    depths: list[float]
    needles_per_cell: int = 1
    haystack: str = "auto"
    haystack_path: str | None = None
    language: str = "en"
    haystack_language: str | None = None
    answer_language: str | None = None
    chat_template: bool = True
    seed: int = 0
    explicit_lengths: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def metadata_from_argv(argv: list[str] | None = None) -> dict[str, Any] | None:
    """The task metadata the user typed on the running command line: a `--config` file's `metadata:` mapping
    overlaid by the `--metadata` JSON object (lm-eval's own precedence), or None when neither gives one."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--metadata")
    parser.add_argument("--config", "-C")
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    typed: dict[str, Any] | None = None
    if known.config:
        from_file = load_run_config(known.config).get("metadata")
        typed = dict(from_file) if isinstance(from_file, dict) else None
    if known.metadata:
        try:
            value = json.loads(known.metadata)
        except json.JSONDecodeError as error:
            raise UserInputError(
                f"--metadata is not valid JSON ({error.msg}); pass a JSON object like '{{\"depths\":[0,50]}}'"
            )
        if isinstance(value, dict):
            typed = {**(typed or {}), **value}
    return typed


def check_metadata_keys(keys: set[str], allowed: dict[str, str] = TASK_KEYS) -> None:
    """Every key the user typed must be one the task knows; the error lists the known ones."""
    unknown = sorted(k for k in keys if k not in allowed and k != "version")
    if unknown:
        raise UserInputError(
            f"unknown --metadata key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(allowed)}"
        )


def _int_list(value: Any, name: str) -> list[int]:
    items = value if isinstance(value, list) else [value]
    try:
        out = [int(v) for v in items]
    except (TypeError, ValueError):
        raise UserInputError(f"{name} must be a list of integers, got {value!r}")
    if not out or any(v <= 0 for v in out):
        raise UserInputError(f"{name} must be a non-empty list of positive integers, got {value!r}")
    return out


def _depth_list(value: Any) -> list[float]:
    items = value if isinstance(value, list) else [value]
    try:
        out = [float(v) for v in items]
    except (TypeError, ValueError):
        raise UserInputError(f"depths must be a list of numbers between 0 and 100, got {value!r}")
    if not out or any(not 0 <= v <= 100 for v in out):
        raise UserInputError(f"depths must be a non-empty list of numbers between 0 and 100, got {value!r}")
    return out


def _as_bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


def parse_grid(metadata: dict[str, Any], argv_metadata: dict[str, Any] | None) -> GridSpec:
    """Build the grid from lm-eval's merged metadata, strictly checking the keys the user typed."""
    if argv_metadata is not None:
        check_metadata_keys(set(argv_metadata))
    explicit = "context_lengths" in metadata
    spec = GridSpec(
        context_lengths=_int_list(metadata["context_lengths"], "context_lengths") if explicit else DEFAULT_CONTEXT_LENGTHS,
        depths=_depth_list(metadata["depths"]) if "depths" in metadata else DEFAULT_DEPTHS,
        needles_per_cell=_int_list(metadata.get("needles_per_cell", 1), "needles_per_cell")[0],
        haystack=str(metadata.get("haystack", "auto")),
        haystack_path=metadata.get("haystack_path"),
        language=str(metadata.get("language", "en")),
        chat_template=_as_bool(metadata.get("chat_template", True)),
        seed=int(metadata.get("needle_seed", 0)),
        explicit_lengths=explicit,
    )
    spec.haystack_language = str(metadata.get("haystack_language") or spec.language)
    spec.answer_language = str(metadata.get("answer_language") or spec.language)
    return spec


def cap_lengths(spec: GridSpec, model_max: int, model_name: str) -> list[int]:
    """Lengths that fit the model: defaults are capped with a warning, lengths the user asked for are an error."""
    limit = model_max - GENERATION_ROOM
    too_long = [n for n in spec.context_lengths if n > limit]
    if not too_long:
        return list(spec.context_lengths)
    if spec.explicit_lengths:
        raise UserInputError(
            f"context length(s) {too_long} exceed what {model_name} can take ({model_max} tokens, {GENERATION_ROOM} "
            f"kept for the answer); use context_lengths up to {limit}"
        )
    kept = sorted({n for n in spec.context_lengths if n <= limit} | {limit})
    message = f"default context lengths capped at {limit} tokens ({model_name} takes {model_max}); running {kept}"
    warnings.warn(message)
    log.warning(message)
    return kept


@lru_cache(maxsize=4)
def load_tokenizer_and_max_length(pretrained: str, gguf_file: str | None = None) -> tuple[Any, int, str]:
    """Tokenizer, maximum context and display name for the model the task will run on (no download)."""
    from transformers import AutoConfig, AutoTokenizer

    from ..models.aliases import resolve_model

    resolved = resolve_model(pretrained, gguf_file)
    kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(resolved.pretrained, **kwargs)
    config = AutoConfig.from_pretrained(resolved.pretrained, **kwargs)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    max_length = getattr(text_config, "max_position_embeddings", None) or 2048
    return tokenizer, int(max_length), resolved.name
