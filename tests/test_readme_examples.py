"""Every command in the README's fenced ```bash blocks, as written: parsed by the parser that will read it, checked by
the plugin, and the cheap ones run.

Each command must match exactly one rule in RULES below, so a new README command fails this test until someone
decides how it is checked. For every command:
- `lm_eval ...`, `lm-eval-retrieval run ...` and `accelerate launch ... -m lm_eval ...`: the argument list goes
  through lm-eval's own command-line parser (`lm_eval run`'s, which splits `--model_args` at commas and refuses a
  piece without `=`) and `--model_args` through `lm_eval.utils.simple_parse_args_string` too (what
  `simple_evaluate` and `mask-sweep` use); then the plugin's model-arg checks (unknown keys, masking args against
  SmolLM2's 30 x 9 heads), the NIAH `--metadata` keys, the task names and run configs;
- other `lm-eval-retrieval ...` commands: the plugin's own parser.
Commands marked "run" then run in a scratch folder holding the files they read (a SmolLM2-shaped head-score file,
two recall-statistics runs). Overrides, only where a command as written would take minutes: the masking example runs
on a 1-document grid (`--metadata '{"context_lengths":[500],"depths":[50]}'`), and the synopsis lines of "The command
line" (placeholders such as FILE) run as `lm-eval-retrieval <command> --help`. The rest are skipped with a reason.
Subprocesses use the installed copy (`make install` after changing the package). About a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lm_eval_retrieval.paths import tasks_dir

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
SMOLLM2_SHAPE = (30, 9)
ONE_DOCUMENT = '{"context_lengths":[500],"depths":[50]}'

# (pattern matched against the command from its start, action); action is "run", "help" or "skip: <reason>".
RULES: list[tuple[str, str]] = [
    (r"make demo\b", "skip: installs the environment and runs a 15-document detection (minutes)"),
    (r"make test\b", "skip: the whole test suite"),
    (r"pip install ", "skip: installs packages"),
    (r"lm_eval --model retrieval-head-hf --model_args pretrained=smollm2-135m +--tasks niah_retrieval_heads_en .*"
     r"--log_samples", "skip: 15 documents, about two minutes (the masking example runs the same path on one)"),
    (r"lm-eval-retrieval heads results/head_score/smollm2-135m\.json --top 10$", "run"),
    # the synopsis of "The command line": placeholders (FILE, RESULTS_DIR, RUN_A, [...], ...) instead of values
    (r"lm-eval-retrieval \S+.*( \[|\bFILE\b|\bRESULTS_DIR\b|\bRUN_A\b| \.\.\.( |$))", "help"),
    (r"lm-eval-retrieval tasks-dir$", "run"),
    (r"lm-eval-retrieval run --model_args pretrained=smollm2-135m,mask_topk=10,",
     "skip: 15 documents (the mask_heads example below runs the same path on one document)"),
    (r"lm-eval-retrieval run --model_args pretrained=smollm2-135m,mask_heads=16-7;11-5 ", "run"),
    (r"lm-eval-retrieval run --model_args pretrained=smollm2-135m,scores=copy;mass;qr;distant ",
     "skip: 15 documents, four scores (tests/test_head_score_definitions.py runs them on a tiny model)"),
    (r"lm-eval-retrieval mask-sweep --model_args", "skip: 9 to 22 runs of 15 documents (minutes)"),
    (r"lm-eval-retrieval heads results/head_score/smollm2-135m\.json results/head_score/smollm2-135m\.mass\.json",
     "skip: needs a scores= detection's four files (tests/test_head_compare.py runs the matrix)"),
    (r"lm-eval-retrieval (detect|mask) --model_path smollm2-135m --s 500 --e 2000 ",
     "skip: the original's 20 x 10 grid, 200 documents (tests/test_original_cli.py checks the lm_eval form)"),
    (r"lm-eval-retrieval run configs/smollm2-135m\.yaml( --tasks \S+ --output_path \S+)?$",
     "skip: the config's full grid, about two minutes"),
    (r"lm_eval run --config configs/smollm2-135m\.yaml", "skip: the config's full grid, about two minutes"),
    (r"lm_eval --model ret-approx-hf --model_args pretrained=smollm2-135m,topk=10,",
     "skip: 20 perplexity documents under the analysis (minutes)"),
    (r"lm-eval-retrieval approx --pretrained smollm2-135m ", "skip: 20 perplexity documents under the analysis"),
    (r"lm-eval-retrieval compare results/exact results/simhash$", "run"),
    (r"lm_eval --model ret-approx-hf --model_args pretrained=smollm2-135m --tasks niah_single_1 ",
     "skip: run by tests/test_ruler_alias.py (one 512-token RULER document)"),
    (r"accelerate launch ", "skip: two processes over the default grid (minutes)"),
    (r"lm_eval --model ret-approx-hf --model_args pretrained=smollm2-135m,approx=",
     "skip: documents under the analysis (minutes); tests/test_head_aware.py runs these args on a tiny model"),
    (r"lm-eval-retrieval leaderboard --methods streaming,", "skip: 11 runs of 10 documents (tests/test_leaderboard.py)"),
    (r"lm-eval-retrieval leaderboard --methods quest,simhash ",
     "skip: 2 hybrid runs of 15 NIAH documents (tests/test_leaderboard.py)"),
]


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def bash_commands() -> list[str]:
    """One string per command: continuation lines joined, blank and comment-only lines dropped."""
    commands = []
    for block in readme_blocks("bash"):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


def argv_of(command: str) -> list[str]:
    """The words a shell would pass: `$(lm-eval-retrieval tasks-dir)` expanded, comments dropped."""
    return shlex.split(command.replace("$(lm-eval-retrieval tasks-dir)", tasks_dir()), comments=True)


def rule_for(command: str) -> str:
    plain = " ".join(argv_of(command))  # quotes gone, so patterns read like the words a program gets
    matches = [action for pattern, action in RULES if re.match(pattern, plain)]
    assert len(set(matches)) == 1, f"README command matches {len(matches)} rules, needs one: {command}"
    return matches[0]


COMMANDS = bash_commands()


def _head_scores_file(path: Path) -> None:
    """A head-score file of SmolLM2's shape (30 layers x 9 heads), the detection's format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scores = {f"{layer}-{head}": [((layer * 9 + head) * 37 % 100) / 100, 0.5]
              for layer in range(SMOLLM2_SHAPE[0]) for head in range(SMOLLM2_SHAPE[1])}
    path.write_text(json.dumps(scores) + "\n")


def _recall_run(folder: Path, approx: str, recall: float) -> None:
    from lm_eval_retrieval.report.recall import write_recall_reports

    layers = [
        {"layer": i, "module": f"model.layers.{i}.self_attn", "queries": [50] * 3, "recall": [recall] * 3,
         "error_norm": [0.1] * 3, "exact_topk_mass": [0.8] * 3, "approx_topk_mass": [0.7] * 3}
        for i in range(2)
    ]
    stats = {"model": "smollm2-135m", "approx": approx, "topk": 10, "layerwise_topk_analysis": True,
             "min_visible_keys": 100, "layers": layers, "mass_curve": {"k": [1, 2], "mass": [[0.5, 0.7]] * 2}}
    write_recall_reports(stats, folder / "smollm2-135m")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """The folder the commands run in, with the files the README's commands read from `results/`."""
    folder = tmp_path_factory.mktemp("readme")
    _head_scores_file(folder / "results" / "head_score" / "smollm2-135m.json")
    _recall_run(folder / "results" / "exact", "exact_topk", 1.0)
    _recall_run(folder / "results" / "simhash", "simhash", 0.6)
    (folder / "configs").symlink_to(ROOT / "configs")
    return folder


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    program = str(BIN / argv[0]) if (BIN / argv[0]).exists() else argv[0]
    return subprocess.run([program, *argv[1:]], capture_output=True, text=True, env=environment, cwd=cwd, timeout=600)


# --------------------------------------------------------------------------------------------------------------------
# parsing and the plugin's checks


def _lm_eval_namespace(words: list[str]):
    """`lm_eval run`'s own parser over these words (what `lm_eval` and `lm-eval-retrieval run` hand to lm-eval)."""
    from lm_eval._cli import HarnessCLI

    words = words if words[:1] == ["run"] else ["run", *words]
    try:
        return HarnessCLI()._parser.parse_args(words)
    except SystemExit as exit_:
        pytest.fail(f"lm-eval's parser refuses {shlex.join(words)} (exit {exit_.code}; see stderr)")


def _check_model_args(model: str, args: dict, raw: str | None) -> None:
    """The plugin's checks that run before any weights load: known keys, alias, masking args against SmolLM2."""
    import inspect

    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import simple_parse_args_string

    from lm_eval_retrieval.models.aliases import ALIASES
    from lm_eval_retrieval.models.base import HookedHFLM
    from lm_eval_retrieval.models.head_trace import RetrievalHeadLM
    from lm_eval_retrieval.models.masking import select_heads
    from lm_eval_retrieval.models.ret_approx import RetApproxLM

    if raw is not None:
        assert simple_parse_args_string(raw) == args, raw  # the other parser lm-eval uses, same result
    cls = {"retrieval-head-hf": RetrievalHeadLM, "ret-approx-hf": RetApproxLM}[model]
    kwargs = dict(args)
    assert str(kwargs.get("pretrained", "smollm2-135m")) in ALIASES or Path(str(kwargs["pretrained"])).exists()
    mask = HookedHFLM._take_mask_args(kwargs)
    mask.pop("mask_mode", None)
    explicit = set()
    for klass in cls.__mro__:
        if klass is HFLM:
            break
        if "__init__" in vars(klass):
            explicit |= set(inspect.signature(klass.__init__).parameters) - {"self", "kwargs"}
    rest = {key: value for key, value in kwargs.items() if key not in explicit}
    HookedHFLM._check_model_args(SimpleNamespace(OWN_ARGS=cls.OWN_ARGS), rest)
    select_heads(SMOLLM2_SHAPE, **mask)


def _check_tasks_and_metadata(tasks: list[str], metadata: dict | None) -> None:
    from lm_eval_retrieval.haystack.grid import parse_grid

    ruler = Path(__import__("lm_eval").__file__).parent / "tasks" / "ruler"
    for task in tasks:
        assert (Path(tasks_dir()) / f"{task}.yaml").is_file() or (ruler / f"{task}.yaml").is_file(), task
    if metadata and all(task.startswith("niah_") and not (ruler / f"{task}.yaml").is_file() for task in tasks):
        parse_grid(metadata, metadata)


def _raw_model_args(words: list[str]) -> str | None:
    return words[words.index("--model_args") + 1] if "--model_args" in words else None


def check_command(command: str) -> None:
    from lm_eval_retrieval.cli import build_parser
    from lm_eval_retrieval.run_config import check_run_config

    words = argv_of(command)
    program = words[0]
    if program == "accelerate":
        words = ["lm_eval", *words[words.index("lm_eval") + 1:]]
        program = "lm_eval"
    if program == "lm_eval" or words[:2] == ["lm-eval-retrieval", "run"]:
        lm_eval_words = words[1:] if program == "lm_eval" else words[2:]
        if not lm_eval_words or "[...]" in lm_eval_words or lm_eval_words[0].startswith("["):
            return  # a synopsis line: run as --help instead
        if lm_eval_words[0].endswith(".yaml"):  # `lm-eval-retrieval run CONFIG [flags]`
            lm_eval_words = ["--config", *lm_eval_words]
        namespace = _lm_eval_namespace(lm_eval_words)
        config = check_run_config(namespace.config) if getattr(namespace, "config", None) else {}
        model = namespace.model or config.get("model") or "retrieval-head-hf"
        config_args = config.get("model_args") or {}
        if isinstance(config_args, str):
            from lm_eval._cli.utils import key_val_to_dict

            config_args = key_val_to_dict(config_args)
        model_args = {**config_args, **(namespace.model_args or {})}
        if model in ("retrieval-head-hf", "ret-approx-hf"):
            _check_model_args(model, model_args, _raw_model_args(lm_eval_words))
        tasks = namespace.tasks or config.get("tasks") or []
        tasks = tasks.split(",") if isinstance(tasks, str) else list(tasks)
        metadata = {**(config.get("metadata") or {}), **(namespace.metadata or {})}
        _check_tasks_and_metadata(tasks, metadata)
    elif program == "lm-eval-retrieval":
        if any(word in ("FILE", "FILE2", "RUN_A", "RESULTS_DIR", "...") or word.startswith("[") for word in words):
            return  # a synopsis line: run as --help instead
        namespace, rest = build_parser().parse_known_args(words[1:])
        assert not rest or namespace.command == "approx", rest
        if namespace.command == "mask-sweep":
            from lm_eval.utils import simple_parse_args_string

            from lm_eval_retrieval.mask_sweep import parse_ks

            parse_ks(namespace.ks)
            _check_model_args("retrieval-head-hf", simple_parse_args_string(namespace.model_args), None)
            _check_tasks_and_metadata(namespace.tasks.split(","), json.loads(namespace.metadata))


def test_every_command_has_exactly_one_rule() -> None:
    assert len(COMMANDS) >= 20
    for command in COMMANDS:
        rule_for(command)
    used = {pattern for pattern, _ in RULES if any(re.match(pattern, " ".join(argv_of(c))) for c in COMMANDS)}
    assert used == {pattern for pattern, _ in RULES}, "rules no README command uses: remove them"


@pytest.mark.parametrize("command", COMMANDS, ids=[c[:60] for c in COMMANDS])
def test_command_parses_and_passes_the_plugins_checks(command: str, scratch: Path, monkeypatch) -> None:
    monkeypatch.chdir(scratch)
    check_command(command)


def test_the_comma_form_of_mask_heads_is_refused_by_lm_evals_parser_and_the_semicolon_form_is_not() -> None:
    with pytest.raises(pytest.fail.Exception, match="refuses"):
        _lm_eval_namespace(["--model", "retrieval-head-hf", "--model_args", "pretrained=x,mask_heads=16-7,11-5"])
    namespace = _lm_eval_namespace(["--model", "retrieval-head-hf", "--model_args", "pretrained=x,mask_heads=16-7;11-5"])
    assert namespace.model_args["mask_heads"] == "16-7;11-5"
    from lm_eval_retrieval.models.masking import select_heads

    assert select_heads(SMOLLM2_SHAPE, mask_heads="16-7;11-5") == [(16, 7), (11, 5)]


# --------------------------------------------------------------------------------------------------------------------
# running


def _commands_with(action: str) -> list[str]:
    return [command for command in COMMANDS if rule_for(command) == action]


@pytest.mark.parametrize("command", _commands_with("help"), ids=lambda c: c[:50])
def test_synopsis_lines_have_their_command(command: str, scratch: Path) -> None:
    words = argv_of(command)
    result = _run([words[0], words[1], "--help"], scratch)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


def test_top_level_help(scratch: Path) -> None:
    result = _run(["lm-eval-retrieval", "--help"], scratch)
    assert result.returncode == 0 and "tasks-dir" in result.stdout, result.stderr


def test_run_cheap_commands_as_written(scratch: Path) -> None:
    commands = {" ".join(argv_of(c)).split(" ")[1]: c for c in _commands_with("run") if "--model_args" not in c}
    assert set(commands) == {"heads", "tasks-dir", "compare"}, commands

    folder = _run(argv_of(commands["tasks-dir"]), scratch)
    assert folder.returncode == 0, folder.stderr
    assert (Path(folder.stdout.strip()) / "niah_retrieval_heads_en.yaml").is_file()

    heads = _run(argv_of(commands["heads"]), scratch)
    assert heads.returncode == 0, heads.stderr
    assert len([line for line in heads.stdout.splitlines() if re.match(r"\| *\d+ ", line)]) == 10

    compared = _run(argv_of(commands["compare"]), scratch)
    assert compared.returncode == 0, compared.stderr
    assert "Δ Recall" in compared.stdout and (scratch / "comparison" / "comparison.md").is_file()


def test_the_python_snippet_reads_the_head_score_file(scratch: Path) -> None:
    (snippet,) = [block for block in readme_blocks("python") if "head_score_list" in block]
    result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=scratch, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("[[[")


def test_the_own_approximation_example_imports(scratch: Path) -> None:
    (code,) = [block for block in readme_blocks("python") if block.startswith("# my_approx.py")]
    (scratch / "my_approx.py").write_text(code)
    probe = ("import my_approx; from lm_eval.api.registry import get_model; "
             "print(get_model('recent-approx-hf').__name__)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=scratch, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("RecentApproxLM")


def test_the_mask_heads_example_runs_on_one_document(scratch: Path) -> None:
    (command,) = [c for c in _commands_with("run") if "mask_heads=" in c]
    words = argv_of(command)
    words[words.index("--metadata") + 1] = ONE_DOCUMENT  # the only override: one document instead of 15
    result = _run(words, scratch)
    assert result.returncode == 0, result.stderr[-3000:]
    out = scratch / words[words.index("--output_path") + 1]
    (results_file,) = out.glob("*/results_*.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["masked_heads"] == {"mode": "uniform", "heads": ["11-5", "16-7"]}
    assert results["results"]["niah_retrieval_heads_en"]["needle_found,none"] in (0.0, 1.0)
