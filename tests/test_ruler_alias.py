"""lm-eval's own RULER tasks with the plugin's model alias: `pretrained=smollm2-135m` sizes RULER's documents.

RULER looks its tokenizer up by name (`AutoTokenizer.from_pretrained(<tokenizer or pretrained>)`); the installed `.pth`
hook (lm_eval_retrieval_autoload.py) wraps that lookup when `lm_eval.tasks.ruler.common_utils` is imported, so an
alias resolves the way the plugin's models resolve it. These tests use the installed copy of the hook (it runs in
every interpreter of the environment): reinstall with `make install` after changing it.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("wonderwords", reason="RULER needs `pip install wonderwords nltk` (the test extra)")
pytest.importorskip("nltk", reason="RULER needs `pip install wonderwords nltk` (the test extra)")

BIN = Path(sys.executable).parent
RULER = Path(__import__("lm_eval").__file__).parent / "tasks" / "ruler"


def _is_wrapped(function) -> bool:
    return bool(getattr(function, "_lm_eval_retrieval", False))


def test_every_ruler_module_gets_the_alias_aware_lookup() -> None:
    """Through lm-eval's own YAML loader, which also re-loads `common_utils.py` by file path for `!function`."""
    from lm_eval.tasks._yaml_loader import load_yaml

    for name in ("niah_single_1.yaml", "cwe.yaml"):
        load_yaml(RULER / name, resolve_func=True)
    modules = sys.modules
    assert _is_wrapped(modules["lm_eval.tasks.ruler.common_utils"].get_tokenizer)
    assert _is_wrapped(modules["lm_eval.tasks.ruler.niah_utils"].get_tokenizer)
    assert _is_wrapped(modules["lm_eval.tasks.ruler.cwe_utils"].get_tokenizer)


def test_the_alias_gives_smollm2s_tokenizer_and_other_names_go_to_ruler() -> None:
    import lm_eval.tasks.ruler.common_utils as common_utils

    tokenizer = common_utils.get_tokenizer("smollm2-135m")
    assert len(tokenizer("The quick brown fox jumps over the lazy dog.").input_ids) > 5
    assert tokenizer.eos_token  # a real tokenizer, not RULER's empty-vocab fallback
    with pytest.raises(AssertionError, match="No tokenizer or pretrained provided"):
        common_utils.get_tokenizer(None)  # RULER's own message, unchanged


def test_niah_single_1_runs_offline_with_the_alias(tmp_path: Path) -> None:
    """One 512-token RULER document through plain `lm_eval`, as the README shows it, with two overrides to keep it
    short: `--gen_kwargs max_gen_toks=24` (RULER asks for 128 new tokens; the 7-digit answer needs far fewer) and
    the output folder. `niah_single_1` uses RULER's repeated-sentence haystack: nothing is downloaded."""
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [
            str(BIN / "lm_eval"), "--model", "ret-approx-hf", "--model_args", "pretrained=smollm2-135m",
            "--tasks", "niah_single_1", "--metadata", '{"max_seq_lengths":[512]}', "--limit", "1",
            "--gen_kwargs", "max_gen_toks=24", "--output_path", str(tmp_path),
        ],
        capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Using tokenizer smollm2-135m" in result.stderr
    results = json.loads(Path(glob.glob(str(tmp_path / "smollm2-135m" / "results_*.json"))[0]).read_text())
    score = results["results"]["niah_single_1"]["512,none"]
    assert 0.0 <= score <= 1.0
    assert (tmp_path / "smollm2-135m" / "recall_stats.json").is_file()  # the analysis ran on RULER's document
