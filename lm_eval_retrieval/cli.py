"""`lm-eval-retrieval`: the plugin's console script.

`run` is lm-eval's own `lm_eval run` with the bundled tasks already on the include path, so everything a harness
user knows (`--model_args`, `--metadata`, `--output_path`, `--log_samples`, `--use_cache`) works unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import UserInputError


def tasks_dir() -> str:
    """Folder of the bundled task YAMLs, inside the installed package."""
    return str(Path(__file__).resolve().parent / "tasks")


def _run(lm_eval_args: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args = list(lm_eval_args)
    if "--include_path" not in args:
        args += ["--include_path", tasks_dir()]
    if "--model" not in args:
        args += ["--model", "retrieval-head-hf"]
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", "run", *args]
    cli_evaluate()
    return 0


def _heads(args: argparse.Namespace) -> int:
    from .report.heads import compare_head_scores, format_comparison, format_ranking, load_head_scores

    if args.top <= 0:
        raise UserInputError(f"--top must be a positive number of heads, got {args.top}")
    scores = load_head_scores(args.file)
    if args.compare is None:
        print(format_ranking(scores, top=args.top))
        return 0
    other = load_head_scores(args.compare)
    result = compare_head_scores(scores, other, top=args.top)
    print(format_comparison(result, Path(args.file).stem, Path(args.compare).stem))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lm-eval-retrieval", description="Retrieval heads and retrieval-based attention analysis for lm-eval."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="lm_eval run with the bundled tasks (default --model retrieval-head-hf)",
        description="Every argument is passed to `lm_eval run`; the bundled tasks need no --include_path.",
    )
    run.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    heads = sub.add_parser("heads", help="rank the heads of a head-score file, or compare two")
    heads.add_argument("file", help="head_score/<model>.json")
    heads.add_argument("--top", type=int, default=10, help="how many heads to show (default 10)")
    heads.add_argument("--compare", metavar="FILE2", help="a second head-score file: top-k overlap and Spearman")
    sub.add_parser("tasks-dir", help="print the folder of the bundled tasks (for lm_eval --include_path)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv[:1] == ["run"]:
        command, rest = "run", argv[1:]
    else:
        namespace = parser.parse_args(argv)
        command, rest = namespace.command, []
    try:
        if command == "run":
            return _run(rest)
        if command == "tasks-dir":
            print(tasks_dir())
            return 0
        return _heads(namespace)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
