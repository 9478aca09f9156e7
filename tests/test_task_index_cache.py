"""lm-eval's task index served from the plugin's cache: same entries as lm-eval's own build, rebuilt on any change."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lm_eval.tasks import _index

from lm_eval_retrieval.task_index_cache import cached_build_for

def lm_eval_build(paths, *, resolve_includes=True):  # type: ignore[no-untyped-def]
    """lm-eval's own TaskIndex.build, whether or not the autoload has wrapped it in this interpreter."""
    build = _index.TaskIndex.build
    return getattr(build, "__wrapped_original__", build)(paths, resolve_includes=resolve_includes)


def write_tasks(root: Path, tag: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "_template_yaml").write_text(f"output_type: generate_until\ntag: {tag}\n")
    (root / "alpha.yaml").write_text("include: _template_yaml\ntask: alpha\n")
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "beta.yaml").write_text("task: beta\ntag: [greek]\n")
    (root / "sub" / "group.yaml").write_text("group: letters\ntask: [alpha, beta]\n")


def summary(index: dict) -> dict:
    return {name: (e.kind.name, str(e.yaml_path), sorted(e.tags), e.cfg) for name, e in sorted(index.items())}


@pytest.fixture()
def counted(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """A cached build over `tmp_path/lm` as lm-eval's folder, and the list of roots lm-eval's build was asked for."""
    monkeypatch.setenv("LMR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LMR_TASK_INDEX_CACHE", raising=False)
    calls: list[list[str]] = []

    def original(paths, *, resolve_includes=True):  # type: ignore[no-untyped-def]
        calls.append([str(p) for p in paths])
        return lm_eval_build(paths, resolve_includes=resolve_includes)

    root = tmp_path / "lm"
    write_tasks(root, tag="first")
    build = cached_build_for(original, root, "0.4.test", logging.getLogger("test-index"))
    return build, root, calls


def test_second_build_reads_the_cache_and_equals_lm_evals_own(counted) -> None:  # type: ignore[no-untyped-def]
    build, root, calls = counted
    first = build([root])
    second = build([root])
    assert len(calls) == 1
    assert summary(first) == summary(second) == summary(lm_eval_build([root]))
    assert {"alpha", "beta", "letters", "first", "greek"} <= set(first)


def test_a_changed_include_template_rebuilds(counted) -> None:  # type: ignore[no-untyped-def]
    build, root, calls = counted
    assert "first" in build([root])
    (root / "_template_yaml").write_text("output_type: generate_until\ntag: second\n")  # only the included file
    index = build([root])
    assert len(calls) == 2
    assert "second" in index and "first" not in index


def test_a_corrupt_cache_file_is_rebuilt(counted, tmp_path) -> None:  # type: ignore[no-untyped-def]
    build, root, calls = counted
    build([root])
    (store,) = (tmp_path / "cache" / "lm-eval-task-index").glob("*.pickle")
    store.write_bytes(b"not a pickle")
    assert summary(build([root])) == summary(lm_eval_build([root]))
    assert len(calls) == 2


def test_other_roots_are_built_each_time_and_override_in_order(counted, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    build, root, calls = counted
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "alpha.yaml").write_text("task: alpha\noutput_type: loglikelihood\n")
    build([root, mine])
    with caplog.at_level(logging.WARNING, logger="test-index"):
        index = build([root, mine])
    assert calls == [[str(root)], [str(mine)], [str(mine)]]
    assert index["alpha"].yaml_path == mine / "alpha.yaml"
    assert "overrides existing task" in caplog.text
    assert summary(index) == summary(lm_eval_build([root, mine]))


def test_the_switch_turns_the_cache_off(counted, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    build, root, calls = counted
    monkeypatch.setenv("LMR_TASK_INDEX_CACHE", "0")
    build([root])
    build([root])
    assert len(calls) == 2


def test_installed_lm_eval_uses_the_cache(tmp_path) -> None:
    """In a fresh interpreter of the environment, the autoload has wrapped lm-eval's TaskIndex.build."""
    code = "from lm_eval.tasks import _index; print(getattr(_index.TaskIndex.build, '_lm_eval_retrieval', False))"
    env = {**os.environ, "LMR_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "True"
