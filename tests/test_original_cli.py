"""`lm-eval-retrieval detect` and `mask`: the original scripts' flags (retrieval_head_detection.py,
retrieval_head_multiling_detection.py, needle_in_haystack_with_mask.py) mapped onto the lm_eval run they stand for,
printed first. No model runs here: `_run` is replaced, and lm-eval's own parser reads the printed command."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import lm_eval_retrieval.cli as cli
import lm_eval_retrieval.original_cli as original
from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.original_cli import INCLUDE_PATH, NAMED_TASKS, original_grid
from lm_eval_retrieval.paths import tasks_dir

ROOT = Path(__file__).resolve().parents[1]
DEPTHS = [0, 11, 22, 33, 44, 56, 67, 78, 89, 100]  # np.round(np.linspace(0, 100, 10)), the original's 10 depths


# --------------------------------------------------------------------------------------------------------------------
# the grid


def test_grid_between_s_and_e_is_the_originals() -> None:
    # the README's command: 20 lengths from 0 to 30000 in steps of 30000/19 = 1578.95, rounded; 0 holds no haystack
    lengths, depths = original_grid(0, 30000)
    assert lengths == [1579, 3158, 4737, 6316, 7895, 9474, 11053, 12632, 14211, 15789, 17368, 18947, 20526, 22105,
                       23684, 25263, 26842, 28421, 30000]
    assert depths == DEPTHS
    # the original's own defaults (1000..50000) are the bundled tasks' default grid
    from lm_eval_retrieval.haystack.grid import DEFAULT_CONTEXT_LENGTHS

    assert original_grid(1000, 50000)[0] == DEFAULT_CONTEXT_LENGTHS
    assert original_grid(500, 2000)[0][:4] == [500, 579, 658, 737]
    assert original_grid(1000, 1000)[0] == [1000], "20 copies of one length run once"
    assert original_grid(100, 110)[0] == list(range(100, 111)), "rounding repeats run once"


@pytest.mark.parametrize(("s", "e", "message"), [(-1, 100, "0 or more"), (500, 100, "below --s"), (0, 0, "positive")])
def test_grid_refuses_what_the_original_could_not_run(s: int, e: int, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        original_grid(s, e)


# --------------------------------------------------------------------------------------------------------------------
# the printed lm_eval form


@pytest.fixture()
def ran(monkeypatch) -> list[list[str]]:
    """`_run` recorded instead of run; the model-length check skipped (its own test below uses the real tokenizer)."""
    calls: list[list[str]] = []
    monkeypatch.setattr(cli, "_run", lambda args: calls.append(list(args)) or 0)
    monkeypatch.setattr(original, "check_lengths_fit", lambda args: None)
    monkeypatch.setattr(original, "check_wandb", lambda args: None)
    return calls


def printed_form(out: str):
    """The `lm_eval form:` line, parsed by lm-eval's own `lm_eval run` parser, and its words."""
    from lm_eval._cli import HarnessCLI

    (line,) = [line for line in out.splitlines() if line.startswith("lm_eval form: ")]
    words = shlex.split(line.removeprefix("lm_eval form: ").replace(INCLUDE_PATH, tasks_dir()))
    assert words[0] == "lm_eval"
    return HarnessCLI()._parser.parse_args(["run", *words[1:]]), words[1:]


def detect(ran, capsys, *flags: str):
    assert cli.main(["detect", *flags]) == 0
    namespace, words = printed_form(capsys.readouterr().out)
    assert len(ran) == 1
    run = ran.pop()
    assert words[:words.index("--include_path")] + words[words.index("--include_path") + 2:] == run, \
        "what runs is what was printed"
    return namespace


def test_detect_prints_the_lm_eval_run_it_stands_for(ran, capsys) -> None:
    namespace = detect(ran, capsys, "--model_path", "Qwen/Qwen2.5-3B-Instruct", "--s", "0", "--e", "30000",
                       "--language", "en", "--quantize", "--wandb")
    assert namespace.model == "retrieval-head-hf"
    assert namespace.model_args == {"pretrained": "Qwen/Qwen2.5-3B-Instruct", "quantize": "4bit"}
    assert namespace.tasks == ["niah_retrieval_heads_en"]
    assert namespace.include_path == tasks_dir()
    assert namespace.metadata == {"context_lengths": original_grid(0, 30000)[0], "depths": DEPTHS}
    assert namespace.output_path == "results/enen" and namespace.log_samples
    assert namespace.wandb_args == {"project": "retrieval-heads"}


@pytest.mark.parametrize(
    ("flags", "task", "language_keys", "output"),
    [
        (["--language", "zh"], "niah_retrieval_heads_zh", {}, "results/zhzh"),
        (["--haystack_language", "zh"], "niah_retrieval_heads_en_in_zh", {}, "results/enzh"),
        (["-hl", "de"], "niah_retrieval_heads_en_in_de", {}, "results/ende"),
        (["--haystack_language", "zh", "--multiling"], "niah_translation_heads_en_zh", {}, "results/enzh_translation"),
        (["--language", "zh", "--haystack_language", "de"], "niah_retrieval_heads_en",
         {"language": "zh", "haystack_language": "de", "answer_language": "zh"}, "results/zhde"),
        (["--language", "de", "-hl", "en", "--multiling"], "niah_retrieval_heads_en",
         {"language": "de", "haystack_language": "de", "answer_language": "en"}, "results/deen_translation"),
    ],
)
def test_languages_pick_the_task(flags, task, language_keys, output, ran, capsys) -> None:
    namespace = detect(ran, capsys, "--model_path", "smollm2-135m", "-s", "500", "-e", "2000", *flags)
    assert namespace.tasks == [task] and namespace.output_path == output
    assert namespace.metadata == {"context_lengths": original_grid(500, 2000)[0], "depths": DEPTHS, **language_keys}


def test_named_tasks_exist_and_mean_their_triple() -> None:
    for (language, haystack, answer), task in NAMED_TASKS.items():
        assert (Path(tasks_dir()) / f"{task}.yaml").is_file(), task
        if task.startswith("niah_translation_heads_"):
            assert language == haystack and task.endswith(f"_{language}_{answer}")
        elif language != haystack:
            assert task.endswith(f"_{language}_in_{haystack}") and answer == language


def test_the_originals_long_flag_names_and_passthrough(ran, capsys) -> None:
    namespace = detect(ran, capsys, "--model_path", "m", "--s_len", "100", "--e_len", "200", "--limit", "3",
                       "--metadata", '{"needles_per_cell":2,"depths":[50]}', "--model_args", "dtype=bfloat16",
                       "--output_path", "out")
    assert namespace.limit == 3 and namespace.output_path == "out"
    assert namespace.metadata == {"context_lengths": original_grid(100, 200)[0], "depths": [50], "needles_per_cell": 2}
    assert namespace.model_args == {"pretrained": "m", "dtype": "bfloat16"}


@pytest.mark.parametrize(
    ("k", "model_args", "output"),
    [
        ("8", {"mask_topk": 8, "head_scores": "results/enen/head_score/smollm2-135m.json"},
         "results/enen/smollm2-135m_block_top8"),
        ("-8", {"mask_random": 8, "head_scores": "results/enen/head_score/smollm2-135m.json"},
         "results/enen/smollm2-135m_block_random8"),
        ("0", {}, "results/enen/smollm2-135m_unmasked"),
    ],
)
def test_mask_prints_mask_topk_or_mask_random(k, model_args, output, ran, capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results" / "enen" / "head_score").mkdir(parents=True)
    (tmp_path / "results" / "enen" / "head_score" / "smollm2-135m.json").write_text('{"0-0": [1.0]}\n')
    assert cli.main(["mask", "--model_path", "smollm2-135m", "--s", "0", "--e", "3000", "--mask_topk", k]) == 0
    namespace, _ = printed_form(capsys.readouterr().out)
    assert namespace.model_args == {"pretrained": "smollm2-135m", **model_args}
    assert namespace.tasks == ["niah_retrieval_heads_en"] and namespace.output_path == output
    assert namespace.metadata == {"context_lengths": original_grid(0, 3000)[0], "depths": DEPTHS}
    assert len(ran) == 1


def test_mask_with_a_file_of_ones_own(ran, capsys, tmp_path) -> None:
    scores = tmp_path / "Qwen2.5-3B-Instruct.json"
    scores.write_text('{"0-0": [1.0]}\n')
    assert cli.main(["mask", "--model_path", "Qwen/Qwen2.5-3B-Instruct", "--s", "0", "--e", "3000", "--mask_topk",
                     "8", "--head_scores", str(scores), "--language", "zh", "--wandb"]) == 0
    namespace, _ = printed_form(capsys.readouterr().out)
    assert namespace.model_args["head_scores"] == str(scores)
    assert namespace.tasks == ["niah_retrieval_heads_zh"]
    assert namespace.output_path == "results/zhzh/Qwen2.5-3B-Instruct_block_top8"
    assert namespace.wandb_args == {"project": "retrieval-heads"}


def test_the_readme_shows_what_detect_prints(ran, capsys) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The original scripts' command lines", 1)[1]
    command = section.split("```bash\n", 1)[1].splitlines()[0]
    shown = section.split("```text\n", 1)[1].splitlines()[0]
    assert cli.main(shlex.split(command)[1:]) == 0
    assert capsys.readouterr().out.splitlines()[0] == shown


# --------------------------------------------------------------------------------------------------------------------
# bad flags: one line each


BAD = [
    (["detect", "--s", "0", "--e", "3000"], "--model_path is required"),
    (["detect", "--model_path", "m", "--e", "3000"], "--s and --e are required"),
    (["detect", "--model_path", "m", "--s", "zero", "--e", "3000"], "--s must be a whole number"),
    (["detect", "--model_path", "m", "--s", "10", "--e", "5"], "--e (5) is below --s (10)"),
    (["detect", "--model_path", "m", "--s", "0", "--e", "3000", "--language", "ar"], "unknown --language 'ar'"),
    (["detect", "--model_path", "m", "--s", "0", "--e", "3000", "-hl", "fr"], "unknown --haystack_language 'fr'"),
    (["detect", "--model_path", "m", "--s", "0", "--e", "3000", "--multiling"], "--multiling scores translation"),
    (["detect", "--model_path", "m", "--s", "0", "--e", "3000", "--model_name_suffix", "x"], "give --output_path"),
    (["detect", "--model_path", "m", "--s", "0", "--e", "3000", "--model_name", "x"], "give --model_path only"),
    (["mask", "--model_path", "m", "--s", "0", "--e", "3000", "--model_provider", "OpenAI", "--api_key", "k"],
     "--model openai-chat-completions"),
    (["mask", "--model_path", "m", "--s", "0", "--e", "3000", "--mask_lang", "enzh"], "give --head_scores FILE"),
    (["mask", "--model_path", "m", "--s", "0", "--e", "3000", "--mask_topk", "top8"], "--mask_topk must be a whole"),
    (["detect", "--model_path", "m", "--s", "0", "--e", "3000", "--tasks", "x"], "`lm-eval-retrieval run --tasks"),
    (["detect", "--model_path", "m", "--s", "0", "--e", "3000", "--metadata", "[1]"], "--metadata must be a JSON"),
    (["mask", "--model_path", "m", "--s", "0", "--e", "3000", "--mask_topk", "8", "--head_scores", "x/head_score/m.json",
      "--output_path", "x"], "would overwrite the head-score file being masked"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a[5:]) or a[0] for a, _ in BAD])
def test_bad_flags_are_one_line(argv: list[str], message: str, ran, capsys) -> None:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert "lm_eval form" not in captured.out, "nothing is printed for a command that is refused"
    assert not ran


def test_missing_head_scores_name_detect(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_run", lambda args: pytest.fail("ran"))
    assert cli.main(["mask", "--model_path", "smollm2-135m", "--s", "0", "--e", "3000", "--mask_topk", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: head-score file results/enen/head_score/smollm2-135m.json does not exist: run "
                   "`lm-eval-retrieval detect` with the same --model_path and languages first, or give --head_scores FILE"]


def test_wandb_without_wandb_is_one_line(monkeypatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else object())
    with pytest.raises(UserInputError, match="needs wandb"):
        original.check_wandb(["--wandb_args", "project=retrieval-heads"])
    original.check_wandb(["--model", "retrieval-head-hf"])  # no --wandb, no check


def test_e_longer_than_the_model_is_refused_naming_e(monkeypatch) -> None:
    """The real check: SmolLM2's tokenizer and config (8192 positions), no weights."""
    monkeypatch.setattr(cli, "_run", lambda args: pytest.fail("ran"))
    namespace = cli.build_parser().parse_args(["detect", "--model_path", "smollm2-135m", "--s", "0", "--e", "30000"])
    with pytest.raises(UserInputError, match=r"--e 30000 is longer than smollm2-135m can take .*use --e 8128 or less"):
        original.check_lengths_fit(namespace)
    original.check_lengths_fit(cli.build_parser().parse_args(["detect", "--model_path", "smollm2-135m", "--s", "0",
                                                              "--e", "8128"]))


def test_console_script_prints_the_form_then_one_error_line(tmp_path) -> None:
    """As a user runs it: a subprocess, wandb missing here (or --e too long where it is installed)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval_retrieval.cli", "detect", "--model_path", "smollm2-135m", "--s", "0", "--e",
         "30000", "--wandb"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 2
    assert result.stdout.startswith("lm_eval form: lm_eval --model retrieval-head-hf ")
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and ("needs wandb" in line or "--e 30000" in line)
    assert not (tmp_path / "results").exists()
