"""The bundled tasks' Python modules (`tasks/lmr_niah.py`, ...), loaded from the folder lm-eval reads them from.

In a source checkout they live in `tasks/` at the repository root, which is not inside the `lm_eval_retrieval`
package (the wheel maps it to `lm_eval_retrieval.tasks`), so tests load them by path, as lm-eval's `!function` does.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from lm_eval_retrieval.paths import tasks_dir


def task_module(name: str) -> ModuleType:
    """`tasks/<name>.py` as a module, loaded once per test session."""
    key = f"_lmr_bundled_tasks.{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(tasks_dir()) / f"{name}.py")
        assert spec is not None and spec.loader is not None, name
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]
