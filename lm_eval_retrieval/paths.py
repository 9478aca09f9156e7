"""Where the bundled tasks are: below both the CLI and the masking sweep, so neither imports the other for it."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def tasks_dir() -> str:
    """Folder of the bundled task YAMLs: the installed package's copy, else `tasks/` of the source checkout.

    `pip install .` puts the repository's `tasks/` into the wheel as the package `lm_eval_retrieval.tasks` (setup.cfg
    maps one onto the other); a source checkout (or an editable install) has it at the repository root only.
    """
    installed = _PACKAGE / "tasks"
    if installed.is_dir():
        return str(installed)
    return str(_PACKAGE.parent / "tasks")
