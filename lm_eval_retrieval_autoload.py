"""Run by the installed `lm_eval_retrieval.pth` in every interpreter of the environment, so it must cost nothing.

A top-level module on purpose: importing the `lm_eval_retrieval` package here would pin the installed copy in
`sys.modules` before the current folder is on `sys.path`, hiding a source checkout from its own tests.

It registers no model itself. It only waits for `lm_eval.api.registry` to be imported (which every `lm_eval` run
does) and then adds the plugin's models as lazy "module:Class" targets, so `lm_eval --model retrieval-head-hf` works
with no flag and without importing torch early. It also turns the plugin's `UserInputError` into one line on stderr
instead of a traceback, whichever program raised it.

The same watch lets lm-eval's own RULER tasks (`niah_single_1`, ...) run with the plugin's model aliases: RULER sizes
its documents with `AutoTokenizer.from_pretrained(<tokenizer or pretrained>)`, which knows nothing of
`pretrained=smollm2-135m`. When `lm_eval.tasks.ruler.common_utils` is imported, its `get_tokenizer` is wrapped so that
an alias (or a `.gguf` file) loads the tokenizer the plugin's models would load; any other name goes to RULER's own
lookup unchanged.

And it spares every `lm_eval` process the ~9 s of parsing lm-eval's own 14,000 task YAMLs: when
`lm_eval.tasks._index` is imported, `TaskIndex.build` is wrapped to read that folder's index from the plugin's cache
(lm_eval_retrieval/task_index_cache.py).
"""

from __future__ import annotations

import importlib.machinery
import sys

REGISTRY_MODULE = "lm_eval.api.registry"
RULER_MODULE = "lm_eval.tasks.ruler.common_utils"
TASK_INDEX_MODULE = "lm_eval.tasks._index"


class _RegistryWatcher:
    """Finds nothing itself; wraps the loader of a watched lm-eval module so the plugin's step runs right after it.

    A meta path finder needs only `find_spec`; not subclassing `importlib.abc.MetaPathFinder` spares every
    interpreter the ~50 ms of `importlib.abc` (it imports `importlib.resources`, `pathlib`, `tempfile`, ...).
    """

    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        after = _AFTER_IMPORT.get(fullname)
        if after is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        original_exec = spec.loader.exec_module

        def exec_module(module):  # type: ignore[no-untyped-def]
            original_exec(module)
            after(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _register_after_registry_import() -> None:
    try:
        from lm_eval_retrieval.registration import register_models

        register_models()
    except Exception as error:  # never break lm-eval itself because of the plugin
        print(f"lm-eval-retrieval: could not register its models: {error}", file=sys.stderr)


def _wrap_ruler_tokenizer(module) -> None:  # type: ignore[no-untyped-def]
    """Make RULER's `get_tokenizer` load the plugin's aliases (`smollm2-135m`); other names go to RULER unchanged.

    Wrapped right after `common_utils` runs, before RULER's task modules do `from ...common_utils import
    get_tokenizer`, so they take the wrapper.
    """
    import functools

    original = getattr(module, "get_tokenizer", None)
    if original is None or getattr(original, "_lm_eval_retrieval", False):
        return

    @functools.cache
    def get_tokenizer(tokenizer=None, pretrained=None, **kwargs):  # type: ignore[no-untyped-def]
        name = tokenizer or pretrained
        try:
            from lm_eval_retrieval.models.aliases import ALIASES, resolve_model
        except Exception:  # never break lm-eval itself because of the plugin
            return original(tokenizer, pretrained, **kwargs)
        if not isinstance(name, str) or not (name in ALIASES or name.endswith(".gguf")):
            return original(tokenizer, pretrained, **kwargs)
        import logging

        from transformers import AutoTokenizer

        resolved = resolve_model(name)  # an alias or a .gguf file, as the plugin's models take them
        extra = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
        log = logging.getLogger(module.__name__)
        log.info("Using tokenizer %s (%s) for synthetic tasks.", name, resolved.pretrained)
        return AutoTokenizer.from_pretrained(resolved.pretrained, **extra)

    get_tokenizer._lm_eval_retrieval = True  # type: ignore[attr-defined]
    get_tokenizer.__wrapped_ruler__ = original  # type: ignore[attr-defined]
    module.get_tokenizer = get_tokenizer
    # lm-eval also loads `common_utils.py` by file path for a YAML's `!function common_utils.x`, and re-runs a module
    # it finds without its `__mtime__` mark, which would put an unwrapped copy in sys.modules for the next RULER task.
    if not hasattr(module, "__mtime__") and getattr(module, "__file__", None):
        import os

        try:
            module.__mtime__ = os.stat(module.__file__).st_mtime_ns
        except OSError:
            pass


def _cache_task_index(module) -> None:  # type: ignore[no-untyped-def]
    """Serve lm-eval's index of its own ~14,000 task YAMLs from the plugin's cache (lm_eval_retrieval/task_index_cache.py)."""
    try:
        from lm_eval_retrieval.task_index_cache import install as install_cache

        install_cache(module)
    except Exception as error:  # never break lm-eval itself because of the plugin
        print(f"lm-eval-retrieval: lm-eval's task index is not cached: {error}", file=sys.stderr)


def _tasks_folder() -> str | None:
    """The plugin's task folder without importing the package: installed copy, else a checkout's `tasks/`."""
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.join(here, "lm_eval_retrieval", "tasks"), os.path.join(here, "tasks")):
        if os.path.isdir(folder) and os.path.isfile(os.path.join(folder, "lmr_niah.py")):
            return folder
    return None


def _unknown_task_line(message: str) -> str:
    """lm-eval's "Tasks not found: x" as one line that lists the plugin's tasks and how to make lm-eval see them."""
    import os

    here = _tasks_folder()
    ours = sorted(name[:-5] for name in os.listdir(here) if name.endswith(".yaml")) if here else []
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


_AFTER_IMPORT = {
    REGISTRY_MODULE: lambda module: _register_after_registry_import(),
    RULER_MODULE: _wrap_ruler_tokenizer,
    TASK_INDEX_MODULE: _cache_task_index,
}


def install() -> None:
    global _previous_hook
    if REGISTRY_MODULE in sys.modules:
        _register_after_registry_import()
    if RULER_MODULE in sys.modules:
        _wrap_ruler_tokenizer(sys.modules[RULER_MODULE])
    if TASK_INDEX_MODULE in sys.modules:
        _cache_task_index(sys.modules[TASK_INDEX_MODULE])
    if not any(isinstance(f, _RegistryWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryWatcher())
    if sys.excepthook is not _one_line_errors:
        _previous_hook = sys.excepthook
        sys.excepthook = _one_line_errors


_previous_hook = sys.excepthook
install()
