"""Run by the installed `lm_eval_retrieval.pth` in every interpreter of the environment, so it must cost nothing.

A top-level module on purpose: importing the `lm_eval_retrieval` package here would pin the installed copy in
`sys.modules` before the current folder is on `sys.path`, hiding a source checkout from its own tests.

It registers no model itself. It only waits for `lm_eval.api.registry` to be imported (which every `lm_eval` run
does) and then adds the plugin's models as lazy "module:Class" targets, so `lm_eval --model retrieval-head-hf` works
with no flag and without importing torch early. It also turns the plugin's `UserInputError` into one line on stderr
instead of a traceback, whichever program raised it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

REGISTRY_MODULE = "lm_eval.api.registry"


class _RegistryWatcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of lm-eval's registry so registration runs right after it."""

    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname != REGISTRY_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        original_exec = spec.loader.exec_module

        def exec_module(module):  # type: ignore[no-untyped-def]
            original_exec(module)
            _register_after_registry_import()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _register_after_registry_import() -> None:
    try:
        from lm_eval_retrieval.registration import register_models

        register_models()
    except Exception as error:  # never break lm-eval itself because of the plugin
        print(f"lm-eval-retrieval: could not register its models: {error}", file=sys.stderr)


def _unknown_task_line(message: str) -> str:
    """lm-eval's "Tasks not found: x" as one line that lists the plugin's tasks and how to make lm-eval see them."""
    import os

    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_retrieval", "tasks")
    ours = sorted(name[:-5] for name in os.listdir(here) if name.endswith(".yaml")) if os.path.isdir(here) else []
    missing = message.split(":", 1)[1].strip()
    return (
        f"unknown task(s) {missing}; the plugin's tasks are {', '.join(ours)}: lm_eval needs "
        "--include_path $(lm-eval-retrieval tasks-dir), or run them with `lm-eval-retrieval run`"
    )


def _one_line_errors(exc_type, exc, tb):  # type: ignore[no-untyped-def]
    if getattr(exc_type, "__module__", "") == "lm_eval_retrieval.errors":
        print(f"error: {exc}", file=sys.stderr)
        return
    if issubclass(exc_type, ValueError) and str(exc).startswith("Tasks not found:"):
        print(f"error: {_unknown_task_line(str(exc))}", file=sys.stderr)
        return
    _previous_hook(exc_type, exc, tb)


def install() -> None:
    global _previous_hook
    if "lm_eval.api.registry" in sys.modules:
        _register_after_registry_import()
    elif not any(isinstance(f, _RegistryWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryWatcher())
    if sys.excepthook is not _one_line_errors:
        _previous_hook = sys.excepthook
        sys.excepthook = _one_line_errors


_previous_hook = sys.excepthook
install()
