"""The ready run configs in configs/: each names a registered model, bundled tasks and known grid keys, and the
SmolLM2 one runs end to end through `lm-eval-retrieval run configs/smollm2-135m.yaml`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lm_eval_retrieval.cli import tasks_dir
from lm_eval_retrieval.haystack.grid import TASK_KEYS
from lm_eval_retrieval.run_config import check_run_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BIN = Path(sys.executable).parent
REQUIRED = ["smollm2-135m", "llama-2-7b-80k", "qwen2.5-3b-instruct", "phi-3.5-mini-instruct", "mistral-7b-instruct-v0.2"]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([str(BIN / "lm-eval-retrieval"), "run", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=900)


def test_every_known_model_has_a_config() -> None:
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(REQUIRED)


@pytest.mark.parametrize("name", REQUIRED)
def test_config_names_registered_model_bundled_tasks_and_known_keys(name: str) -> None:
    from lm_eval.api.registry import get_model

    path = CONFIGS / f"{name}.yaml"
    config = check_run_config(str(path))
    assert get_model(config["model"]).__name__ == "RetrievalHeadLM"
    tasks = config["tasks"] if isinstance(config["tasks"], list) else config["tasks"].split(",")
    bundled = {p.stem for p in Path(tasks_dir()).glob("*.yaml")}
    assert set(tasks) <= bundled, set(tasks) - bundled
    assert set(config["metadata"]) <= set(TASK_KEYS)
    assert config["model_args"]["pretrained"]
    assert set(config["model_args"]) <= {"pretrained", "dtype", "base_attn", "quantize", "gguf_file", "max_length"}
    assert config["output_path"].startswith("results/")


def test_smollm2_config_runs_and_command_line_flags_override_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _run(str(CONFIGS / "smollm2-135m.yaml"), "--metadata", '{"context_lengths":[300],"depths":[50]}',
                  "--output_path", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((out / "head_score" / "smollm2-135m.json").read_text())
    assert len(scores) == 30 * 9 and all(len(v) == 1 for v in scores.values()), "one document, counted"
    samples = list(out.glob("*/samples_niah_retrieval_heads_en_*.jsonl"))
    assert len(samples) == 1, "log_samples: true comes from the config file"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"modle_args": {}}, "unknown key(s) 'modle_args' in config"),
        ({"metadata": {"context_length": [300]}}, "unknown --metadata key(s) 'context_length'"),
    ],
)
def test_a_config_typo_is_a_one_line_error(tmp_path: Path, edit: dict, message: str) -> None:
    config = yaml.safe_load((CONFIGS / "smollm2-135m.yaml").read_text())
    config.update(edit)
    config["output_path"] = str(tmp_path / "out")
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _run(str(path), cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
