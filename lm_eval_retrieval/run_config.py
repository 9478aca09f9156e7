"""Run configs: lm-eval's own `--config` YAML files (model, model_args, tasks, metadata, ...), one per known model in
`configs/`, checked before any model loads so a typo costs a one-line error instead of a half-run."""

from __future__ import annotations

from typing import Any

from .errors import UserInputError


def load_run_config(path: str) -> dict[str, Any]:
    """An lm-eval `--config` YAML file as a dict, or a one-line error saying what is wrong with it."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle)
    except FileNotFoundError:
        raise UserInputError(f"config file {path!r} does not exist; copy one from configs/ and edit it")
    except (OSError, UnicodeDecodeError) as error:
        raise UserInputError(f"cannot read config file {path!r} ({error})")
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserInputError(f"config file {path!r} is not valid YAML{where}; fix its syntax")
    if not isinstance(loaded, dict):
        raise UserInputError(f"config file {path!r} must be a YAML mapping (model:, model_args:, tasks:, ...)")
    return loaded


def check_run_config(path: str) -> dict[str, Any]:
    """Load `path` and check that every top-level key is one lm-eval's config knows; returns the config. (Metadata keys
    are checked by the task that reads them, which knows its own.)"""
    from dataclasses import fields

    from lm_eval.config.evaluate_config import EvaluatorConfig

    config = load_run_config(path)
    known = {f.name for f in fields(EvaluatorConfig)}
    unknown = sorted(str(key) for key in config if key not in known)
    if unknown:
        raise UserInputError(
            f"unknown key(s) {', '.join(map(repr, unknown))} in config {path!r}; use lm_eval's option names "
            "(model, model_args, tasks, metadata, output_path, log_samples, ...)"
        )
    for mapping in ("model_args", "metadata"):
        if mapping in config and not isinstance(config[mapping], (dict, str)):
            raise UserInputError(f"{mapping} in config {path!r} must be a mapping of name: value")
    return config
