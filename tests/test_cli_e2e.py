"""The real entry points, as a user types them: `lm_eval ...` and `lm-eval-retrieval ...` in subprocesses."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lm_eval_retrieval.cli import tasks_dir

BIN = Path(sys.executable).parent
GRID = '{"context_lengths":[300,600],"depths":[0,100]}'


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(list(args), capture_output=True, text=True, env=env, cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def detection_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    result = _run(
        str(BIN / "lm_eval"), "--model", "retrieval-head-hf", "--model_args", "pretrained=smollm2-135m",
        "--tasks", "niah_retrieval_heads_en", "--include_path", tasks_dir(),
        "--metadata", GRID, "--output_path", str(out), "--log_samples",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_lm_eval_writes_a_head_score_file_the_seed_snippet_reads(detection_run: Path) -> None:
    path = detection_run / "head_score" / "smollm2-135m.json"
    with open(path) as file:
        head_list = json.loads(file.readline())  # the seed README's own way of reading it
    assert len(head_list) == 30 * 9
    assert set(head_list) == {f"{layer}-{head}" for layer in range(30) for head in range(9)}
    values = np.array([v for scores in head_list.values() for v in scores])
    assert len(values) == 30 * 9 * 4, "every one of the 4 documents is answered right at these lengths"
    assert values.min() >= 0.0 and values.max() <= 1.0
    assert max(np.mean(scores) for scores in head_list.values()) > 0


def test_results_json_and_log_samples(detection_run: Path) -> None:
    results = json.loads(Path(glob.glob(str(detection_run / "*" / "results_*.json"))[0]).read_text())
    info = results["config"]["retrieval_heads"]
    assert info["documents_run"] == 4 and info["documents_counted"] == 4
    assert len(info["top_heads"]) == 20 and info["top_heads"][0]["score"] > 0
    assert results["results"]["niah_retrieval_heads_en"]["needle_found,none"] == 1.0
    samples = [json.loads(line) for line in open(glob.glob(str(detection_run / "*" / "samples_*.jsonl"))[0])]
    assert len(samples) == 4
    assert sorted((s["doc"]["context_length"], s["doc"]["depth"]) for s in samples) == [
        (300, 0.0), (300, 100.0), (600, 0.0), (600, 100.0)
    ]
    for sample in samples:
        assert sample["doc"]["length"] <= sample["doc"]["context_length"]
        assert sample["doc"]["answer"] in sample["resps"][0][0]


def test_heads_command_ranks_the_file(detection_run: Path) -> None:
    path = str(detection_run / "head_score" / "smollm2-135m.json")
    result = _run(str(BIN / "lm-eval-retrieval"), "heads", path, "--top", "3")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 1 ") or line.startswith("| 3 ")]
    assert len(rows) == 2
    compared = _run(str(BIN / "lm-eval-retrieval"), "heads", path, "--compare", path)
    assert compared.returncode == 0 and "10/10" in compared.stdout.replace(" ", "")


def test_tasks_dir_holds_the_task() -> None:
    result = _run(str(BIN / "lm-eval-retrieval"), "tasks-dir")
    assert (Path(result.stdout.strip()) / "niah_retrieval_heads_en.yaml").is_file()


def test_import_does_not_import_torch() -> None:
    code = "import sys, lm_eval_retrieval; import lm_eval.api.registry as r; print('torch' in sys.modules, 'retrieval-head-hf' in r.model_registry, 'hf' in r.model_registry)"
    result = _run(sys.executable, "-c", code)
    assert result.stdout.split() == ["False", "True", "True"], result.stderr


@pytest.mark.parametrize(
    ("model_args", "message"),
    [
        ("pretrained=no-such-model", "unknown model 'no-such-model'"),
        ("pretrained=/nonexistent/dir", "unknown model '/nonexistent/dir'"),
        ("pretrained=smollm2-135m,base_attn=flashy", "unknown base_attn='flashy'"),
    ],
)
def test_bad_model_args_are_one_line_errors(tmp_path: Path, model_args: str, message: str) -> None:
    result = _run(
        str(BIN / "lm_eval"), "--model", "retrieval-head-hf", "--model_args", model_args,
        "--tasks", "niah_retrieval_heads_en", "--include_path", tasks_dir(), "--output_path", str(tmp_path),
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "head_score").exists()


def test_run_finds_the_bundled_task_and_rejects_a_metadata_typo(tmp_path: Path) -> None:
    # No --include_path and no --model: `run` adds both. The typo is caught inside the task's own dataset code,
    # so reaching that message proves lm-eval found the bundled task.
    result = _run(
        str(BIN / "lm-eval-retrieval"), "run", "--model_args", "pretrained=smollm2-135m",
        "--tasks", "niah_retrieval_heads_en", "--metadata", '{"depth":[50]}', "--output_path", str(tmp_path),
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "unknown --metadata key(s) 'depth'" in errors[0] and "depths" in errors[0]
    assert not (tmp_path / "head_score").exists()
