"""The bundled tasks' layout: `tasks/` at the repository root, one NIAH template, and a wheel that ships them all.

`tasks/` is the design's declared layout (a clone runs `lm_eval --include_path tasks/`); setup.cfg maps it onto the
package `lm_eval_retrieval.tasks`, so the installed copy sits inside the package where `lm-eval-retrieval tasks-dir`
finds it, and `pip install .` builds it without a setuptools warning.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from setuptools import find_packages

from lm_eval_retrieval.paths import tasks_dir

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tasks"
BIN = Path(sys.executable).parent
NIAH = sorted(path.stem for path in TASKS.glob("niah_*.yaml"))


def test_a_checkout_reads_the_tasks_at_the_repository_root() -> None:
    assert Path(tasks_dir()) == TASKS
    assert not (ROOT / "lm_eval_retrieval" / "tasks").exists(), "the tasks moved to tasks/ at the repository root"


def test_lm_eval_lists_every_task_and_not_the_template() -> None:
    from lm_eval.tasks import TaskManager

    ours = {name for name in TaskManager(include_path=str(TASKS)).all_tasks
            if name.startswith(("niah_retrieval", "niah_translation", "retrieval_ppl"))}
    assert len(NIAH) == 7
    assert ours == {*NIAH, "retrieval_ppl_en", "niah_retrieval_heads"}  # the last one is the seven tasks' tag
    assert not any("template" in name for name in ours)


@pytest.mark.parametrize("name", NIAH)
def test_each_niah_task_keeps_only_what_differs(name: str) -> None:
    from lm_eval.tasks._yaml_loader import load_yaml

    own = load_yaml(TASKS / f"{name}.yaml", resolve_func=False, recursive=False)
    assert set(own) == {"include", "task", "custom_dataset"}
    assert own["include"] == "_niah_template_yaml" and own["task"] == name
    merged = load_yaml(TASKS / f"{name}.yaml", resolve_func=True)
    assert merged["custom_dataset"].__name__ == name
    assert merged["output_type"] == "generate_until" and merged["tag"] == ["niah_retrieval_heads"]
    assert [m["metric"] for m in merged["metric_list"]] == ["rouge1_recall", "needle_found"]
    assert merged["generation_kwargs"] == {"do_sample": False, "until": ["\n"], "max_gen_toks": 50}
    assert merged["process_results"].__name__ == "process_results"


def test_setup_cfg_lists_every_package_and_maps_the_tasks() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = config["options"]["packages"].split()
    found = find_packages(str(ROOT), include=["lm_eval_retrieval*"])
    assert sorted(listed) == sorted([*found, "lm_eval_retrieval.tasks"]), "a package is missing from setup.cfg"
    assert config["options"]["package_dir"].split() == ["lm_eval_retrieval.tasks", "=", "tasks"]
    patterns = [p.strip() for p in config["options.package_data"]["lm_eval_retrieval.tasks"].split(",")]
    shipped = {path.name for path in TASKS.iterdir() if path.is_file() and (path.suffix == ".py" or any(
        path.match(pattern) for pattern in patterns))}
    assert shipped == {path.name for path in TASKS.iterdir() if path.is_file()}


def test_the_installed_copy_ships_every_task_file() -> None:
    """`make install` (a regular `pip install .`) put the tasks inside the package; `tasks-dir` names that copy."""
    result = subprocess.run([str(BIN / "lm-eval-retrieval"), "tasks-dir"], capture_output=True, text=True, timeout=120,
                            cwd="/")
    assert result.returncode == 0, result.stderr
    installed = Path(result.stdout.strip())
    assert installed.parts[-2:] == ("lm_eval_retrieval", "tasks") and installed != TASKS
    expected = {path.name for path in TASKS.iterdir() if path.is_file()}
    assert expected <= {path.name for path in installed.iterdir()}


def test_building_the_wheel_prints_no_setuptools_warning_about_the_tasks(tmp_path: Path) -> None:
    """What `pip install .` builds, from a copy of the sources (the build must not touch the checkout's build/)."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.cfg", "setup.py", "pyproject.toml", "README.md", "lm_eval_retrieval.pth",
                 "lm_eval_retrieval_autoload.py"):
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "lm_eval_retrieval", source / "lm_eval_retrieval", ignore=ignore)
    shutil.copytree(TASKS, source / "tasks", ignore=ignore)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", ".", "-w", str(tmp_path)],
        capture_output=True, text=True, cwd=source, timeout=300, env=dict(os.environ, PIP_NO_INPUT="1"),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    for warning in ("Package would be ignored", "absent from the `packages` configuration", "package init file"):
        assert warning not in output
    import zipfile

    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"lm_eval_retrieval/tasks/{path.name}" for path in TASKS.iterdir() if path.is_file()} <= names
