"""The README's bad-input table, row by row, through the real entry points.

Each row runs `lm_eval ...` or `lm-eval-retrieval ...` as a subprocess, the way a user types it, and checks what
the table promises: a non-zero exit, exactly one `error: ...` line that names the fix, no traceback, and that the
files an earlier run left in the output folder are byte-for-byte and mtime-for-mtime untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_cli_e2e import BIN, _run

from lm_eval_retrieval.cli import tasks_dir

LM_EVAL = str(BIN / "lm_eval")
LMR = str(BIN / "lm-eval-retrieval")


def _detect(model_args: str, *extra: str, task: str = "niah_retrieval_heads_en") -> list[str]:
    return [LM_EVAL, "--model", "retrieval-head-hf", "--model_args", model_args, "--tasks", task,
            "--include_path", tasks_dir(), *extra]


def _approx(model_args: str) -> list[str]:
    return [LM_EVAL, "--model", "ret-approx-hf", "--model_args", model_args, "--tasks", "retrieval_ppl_en",
            "--include_path", tasks_dir()]


SMOL = "pretrained=smollm2-135m"

# (row id, command with {files} placeholders, the text the error line must hold). `{out}` is the earlier run's folder.
CASES = [
    ("unknown model alias", _detect("pretrained=smollm2-13m"), "unknown model 'smollm2-13m'"),
    ("hub id not downloaded (offline)", _detect("pretrained=no-org/no-such-model"), "`hf download no-org/no-such-model`"),
    ("missing model path", _detect("pretrained=/nonexistent/model"), "no such folder or file"),
    ("corrupt GGUF", _detect("pretrained={files}/corrupt.gguf"), "check that the file is a complete, uncorrupted model"),
    ("unknown task", _detect(SMOL, task="niah_retrieval_heads_fr"), "unknown task(s) niah_retrieval_heads_fr"),
    ("unknown task without include path", [LM_EVAL, "--model", "retrieval-head-hf", "--tasks", "niah_retrieval_heads_en"],
     "--include_path $(lm-eval-retrieval tasks-dir)"),
    ("unknown language", _detect(SMOL, "--metadata", '{"language":"fr"}'), "unknown language 'fr'; supported languages: en, zh, de"),
    ("unknown haystack language", [LMR, "run", "--tasks", "niah_retrieval_heads_en", "--metadata", '{"haystack_language":"xx"}'],
     "unknown haystack_language 'xx'"),
    ("empty haystack file", _detect(SMOL, "--metadata", '{"haystack_path":"{files}/empty.txt"}'), "has only 0 characters of text"),
    ("too-short haystack file", _detect(SMOL, "--metadata", '{"haystack_path":"{files}/short.txt","context_lengths":[500]}'),
     "give a file with at least"),
    ("context longer than the model", _detect(SMOL, "--metadata", '{"context_lengths":[20000]}'), "use context_lengths up to 8128"),
    ("metadata key that does not exist", _detect(SMOL, "--metadata", '{"depth":[50]}'), "unknown --metadata key(s) 'depth'"),
    ("unknown model_args key", _approx(SMOL + ",topk_k=5"), "unknown model_args key(s) 'topk_k'"),
    ("topk <= 0", _approx(SMOL + ",topk=0"), "topk must be a positive number of keys (e.g. topk=128) or a share"),
    ("topk <= 0 (seed flags)", [LMR, "approx", "--topk", "-1"], "--topk must be a positive number of keys (e.g. --topk=128)"),
    ("bad approx= target", _approx(SMOL + ",approx=no_such_pkg.mod:fn"), "approx='no_such_pkg.mod:fn' cannot be imported"),
    ("head-score file missing", _detect(SMOL + ",mask_topk=5,head_scores={files}/missing.json"), "does not exist"),
    ("head-score file corrupt", _detect(SMOL + ",mask_topk=5,head_scores={files}/corrupt.json"), "is not valid JSON"),
    ("head-score file of another model", _detect(SMOL + ",mask_topk=5,head_scores={files}/other_model.json"),
     "is for a model of 2 layers x 4 heads, this model has 30 x 9"),
    ("mask_topk > heads", _detect(SMOL + ",mask_topk=300,head_scores={files}/smollm2.json"), "use 0..270"),
    ("mask_heads out of range", _detect(SMOL + ",mask_heads=30-0"), "use layers 0-29 and heads 0-8"),
    ("mask-sweep without a head-score file", [LMR, "mask-sweep", "--head_scores", "{files}/missing.json"], "does not exist"),
    ("base_attn=flash_attention_2 without CUDA", _detect(SMOL + ",base_attn=flash_attention_2"), "needs a CUDA GPU"),
    ("unknown base_attn", _approx(SMOL + ",base_attn=flashy"), "unknown base_attn='flashy'"),
    ("quantize on a GGUF model", _detect(SMOL + ",quantize=4bit"), "does not apply to a GGUF model"),
    ("quantize without a working bitsandbytes", _detect("pretrained={tiny},quantize=4bit"),
     "pip install 'lm-eval-retrieval[quantize]'"),
    ("unwritable output path", _detect(SMOL, "--output_path", "{files}/a_file/results"), "is a file, not a folder"),
    ("run config that does not exist", [LMR, "run", "configs/no-such-model.yaml"], "does not exist; copy one from configs/"),
]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("bad-input")
    (folder / "corrupt.gguf").write_bytes(os.urandom(4096))
    (folder / "empty.txt").write_text("")
    (folder / "short.txt").write_text("One short sentence.")
    (folder / "corrupt.json").write_text("{not json")
    (folder / "other_model.json").write_text(json.dumps({f"{l}-{h}": [0.5] for l in range(2) for h in range(4)}))
    (folder / "smollm2.json").write_text(json.dumps({f"{l}-{h}": [0.1] for l in range(30) for h in range(9)}))
    (folder / "a_file").write_text("a file where a folder is expected")
    # A bitsandbytes that is installed but cannot run here, as on a machine it was not built for.
    shim = folder / "broken_bnb" / "bitsandbytes"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise RuntimeError('no native library for this platform')\n")
    return {"files": str(folder), "tiny": tiny_model_dir, "shim": str(folder / "broken_bnb")}


def _earlier_run(folder: Path) -> Path:
    """An output folder that already holds a finished run's files."""
    (folder / "head_score").mkdir(parents=True)
    (folder / "head_score" / "smollm2-135m.json").write_text('{"0-0": [1.0]}')
    (folder / "smollm2-135m").mkdir()
    (folder / "smollm2-135m" / "recall_table.md").write_text("| layer | recall |\n")
    return folder


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@dataclass
class Outcome:
    result: subprocess.CompletedProcess
    before: dict[str, tuple[bytes, int]]
    after: dict[str, tuple[bytes, int]]


@pytest.fixture(scope="module")
def outcomes(bad_files, tmp_path_factory) -> dict[str, Outcome]:
    """Every row's command, two at a time (each spends most of its time importing lm-eval on one core)."""

    def run_case(case: tuple[str, list[str], str]) -> tuple[str, Outcome]:
        name, command, _ = case
        earlier = _earlier_run(tmp_path_factory.mktemp("earlier"))
        argv = [arg.replace("{files}", bad_files["files"]).replace("{tiny}", bad_files["tiny"]) for arg in command]
        if "--output_path" not in argv:
            argv += ["--output_path", str(earlier)]
        env = {"PYTHONPATH": bad_files["shim"]} if "{tiny}" in " ".join(command) else {}
        before = _snapshot(earlier)
        result = _run(*argv, env=env, cwd=earlier)
        return name, Outcome(result, before, _snapshot(earlier))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run_case, CASES))


@pytest.mark.parametrize(("name", "message"), [(case[0], case[2]) for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_that_names_the_fix(name: str, message: str, outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes[name]
    stderr = outcome.result.stderr
    assert outcome.result.returncode != 0, outcome.result.stdout[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    assert message in errors[0], errors[0]
    assert stderr.rstrip().splitlines()[-1] == errors[0], "the error is the last thing the user sees"
    assert outcome.after == outcome.before, "files of the earlier run were touched"


def test_the_readme_table_lists_every_row() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("## Bad input", 1)[1]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) >= 15
    missing = sorted({case[0] for case in CASES} - set(rows))
    assert not missing, f"README's bad-input table lacks rows: {missing}"
