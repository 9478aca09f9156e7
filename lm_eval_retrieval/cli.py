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
from .paths import tasks_dir
from .report.files import check_writable
from .run_config import check_run_config

__all__ = ["build_parser", "main", "tasks_dir"]


def _import_user_module(module_name: str) -> None:
    import importlib

    sys.path.insert(0, os.getcwd())
    try:
        importlib.import_module(module_name)
    except ImportError as error:
        raise UserInputError(f"--import {module_name}: {error}; give a module importable from this folder")


def _value_of(args: list[str], flag: str) -> str:
    position = args.index(flag)
    if position + 1 >= len(args) or args[position + 1].startswith("--"):
        raise UserInputError(f"{flag} needs a value")
    return args[position + 1]


def _run(lm_eval_args: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args = list(lm_eval_args)
    while "--import" in args:  # a user's module that registers models or approximations
        position = args.index("--import")
        if position + 1 >= len(args):
            raise UserInputError("--import needs a module name, e.g. --import my_approx")
        module_name = args.pop(position + 1)
        args.pop(position)
        _import_user_module(module_name)
    if args and args[0].endswith((".yaml", ".yml")) and not args[0].startswith("-"):
        args = ["--config", *args]  # `lm-eval-retrieval run configs/smollm2-135m.yaml [overrides]`
    config: dict = {}
    for flag in ("--config", "-C"):
        if flag in args:
            config = check_run_config(_value_of(args, flag))
    if "--include_path" not in args and "include_path" not in config:
        args += ["--include_path", tasks_dir()]
    if "--model" not in args and "model" not in config:
        args += ["--model", "retrieval-head-hf"]
    if "--output_path" not in args and config.get("output_path"):
        check_writable(str(config["output_path"]))
    if "--output_path" in args:
        check_writable(_value_of(args, "--output_path"))
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", "run", *args]
    cli_evaluate()
    return 0


def _approx(args: argparse.Namespace, passthrough: list[str]) -> int:
    """The original `check_retrieved_perf.py` flags, turned into an `lm_eval run` of ret-approx-hf."""
    from .attention.budget import parse_budget

    parse_budget(args.topk, "--topk")
    model_args = [
        f"pretrained={args.pretrained}",
        f"topk={args.topk}",
        f"layerwise_topk_analysis={args.layerwise_topk_analysis}",
        f"approx={args.approx}",
        f"base_attn={args.base_attn}",
    ]
    if args.approx_args:
        model_args.append(f"approx_args={args.approx_args}")
    if args.model_args:
        model_args.append(args.model_args)
    lm_eval_args = [
        "--model", args.model_type, "--model_args", ",".join(model_args), "--tasks", args.tasks,
        "--batch_size", str(args.batch), "--output_path", args.output_path, *passthrough,
    ]
    if args.limit is not None:
        lm_eval_args += ["--limit", str(args.limit)]
    _run(lm_eval_args)
    from lm_eval.utils import sanitize_model_name

    table = Path(args.output_path) / sanitize_model_name(args.pretrained) / "recall_table.md"
    if table.is_file():
        print(table.read_text())
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .report.compare_runs import format_comparison, write_comparison
    from .report.recall import load_recall_stats

    paths = write_comparison(args.run_a, args.run_b, args.output_dir)
    a, b = load_recall_stats(args.run_a), load_recall_stats(args.run_b)
    print(format_comparison(a, b, Path(args.run_a).name, Path(args.run_b).name))
    print("written: " + ", ".join(str(p) for p in paths))
    return 0


def _mask_sweep(args: argparse.Namespace) -> int:
    import json

    from lm_eval.utils import simple_parse_args_string

    from .mask_sweep import check_head_score_files, default_output_dir, parse_ks, parse_seeds, run_mask_sweep

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ks = parse_ks(args.ks)
    if args.seeds is not None and args.seed is not None:
        raise UserInputError("give --seed S (one random draw) or --seeds 0,1,2 (several), not both")
    seeds = parse_seeds(args.seeds) if args.seeds is not None else [0 if args.seed is None else args.seed]
    metadata = json.loads(args.metadata) if args.metadata else None
    if metadata is not None and not isinstance(metadata, dict):
        raise UserInputError("--metadata must be a JSON object, e.g. '{\"context_lengths\":[500,1000]}'")
    check_head_score_files(args.head_scores)
    output = args.output_path or default_output_dir(args.head_scores)
    check_writable(output)
    table = run_mask_sweep(
        simple_parse_args_string(args.model_args), args.head_scores, ks, args.tasks.split(","), output,
        metadata=metadata, seeds=seeds, mode=args.mask_mode, limit=args.limit, use_cache=args.use_cache,
    )
    shown = table.drop(columns=["heads", "file"]).astype({"seed": "object"}).fillna("")
    print(shown.to_markdown(index=False))
    print(f"written under {output}: mask_sweep.csv, mask_sweep.png, one NIAH heatmap per run")
    return 0


def _leaderboard(args: argparse.Namespace) -> int:
    import json

    from lm_eval.utils import simple_parse_args_string

    from .leaderboard import leaderboard_markdown, parse_budgets, parse_methods, run_leaderboard

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    methods, budgets = parse_methods(args.methods), parse_budgets(args.budgets)
    metadata = json.loads(args.metadata) if args.metadata else None
    if metadata is not None and not isinstance(metadata, dict):
        raise UserInputError("--metadata must be a JSON object, e.g. '{\"context_lengths\":[500,1000]}'")
    per_method = {}
    for item in args.approx_args or []:
        method, equals, values = item.partition("=")
        if not equals or method not in methods:
            raise UserInputError(f"--approx_args takes method=name:value;..., one of {', '.join(methods)}; got {item!r}")
        per_method[method] = values
    check_writable(args.output_path)
    table = run_leaderboard(
        simple_parse_args_string(args.model_args), methods, budgets, args.tasks.split(","), args.output_path,
        metadata=metadata, limit=args.limit, use_cache=args.use_cache, approx_args=per_method,
    )
    print(leaderboard_markdown(table))
    print(f"written under {args.output_path}: leaderboard.csv, leaderboard.md, leaderboard.png, runs/")
    return 0


def _heads(args: argparse.Namespace) -> int:
    from .report.heads import (
        compare_head_scores, compare_many, format_comparison, format_matrix, format_ranking, load_head_scores,
        method_labels,
    )

    if args.top <= 0:
        raise UserInputError(f"--top must be a positive number of heads, got {args.top}")
    files = [*args.file, *(args.compare or [])]
    if not files:
        raise UserInputError("give a head-score file: heads FILE, or heads A B C --compare to compare several")
    if args.compare is None:
        if len(files) != 1:
            raise UserInputError(
                f"heads ranks one file and got {len(files)}; to compare several add --compare: heads A B C --compare"
            )
        print(format_ranking(load_head_scores(files[0]), top=args.top))
        return 0
    if len(files) < 2:
        raise UserInputError("--compare needs at least two head-score files: heads A B [C ...] --compare")
    scores = [load_head_scores(path) for path in files]
    if len(files) == 2:  # side by side, as before
        result = compare_head_scores(scores[0], scores[1], top=args.top)
        print(format_comparison(result, Path(files[0]).stem, Path(files[1]).stem))
        return 0
    labels = method_labels(files)
    print(format_matrix(compare_many(list(zip(labels, scores))), top=args.top, files=files))
    return 0


def _detect(args: argparse.Namespace, passthrough: list[str]) -> int:
    """The original `retrieval_head_detection.py` / `retrieval_head_multiling_detection.py` flags, turned into an
    `lm_eval run` of retrieval-head-hf over the bundled NIAH task; the lm_eval form is printed first."""
    from .original_cli import check_lengths_fit, check_wandb, detect_lm_eval_args, result_name, shell_form

    lm_eval_args = detect_lm_eval_args(args, passthrough)
    print(f"lm_eval form: {shell_form(lm_eval_args)}", flush=True)
    check_wandb(lm_eval_args)
    check_lengths_fit(args)
    _run(lm_eval_args)
    output = lm_eval_args[lm_eval_args.index("--output_path") + 1]
    path = Path(output) / "head_score" / f"{result_name(str(args.model_path))}.json"
    if path.is_file():
        from .report.heads import format_ranking, load_head_scores

        print(f"head scores: {path}")
        print(format_ranking(load_head_scores(path), top=10))
    return 0


def _mask(args: argparse.Namespace, passthrough: list[str]) -> int:
    """The original `needle_in_haystack_with_mask.py` flags, turned into an `lm_eval run` of retrieval-head-hf with
    `mask_topk=` / `mask_random=`; the lm_eval form is printed first."""
    from .original_cli import check_lengths_fit, check_wandb, mask_head_scores, mask_lm_eval_args, shell_form

    lm_eval_args = mask_lm_eval_args(args, passthrough)
    print(f"lm_eval form: {shell_form(lm_eval_args)}", flush=True)
    check_wandb(lm_eval_args)
    head_scores = mask_head_scores(args)
    if int(args.mask_topk) != 0 and not Path(head_scores).is_file():
        raise UserInputError(
            f"head-score file {head_scores} does not exist: run `lm-eval-retrieval detect` with the same --model_path "
            "and languages first, or give --head_scores FILE"
        )
    check_lengths_fit(args)
    return _run(lm_eval_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lm-eval-retrieval", description="Retrieval heads and retrieval-based attention analysis for lm-eval."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="lm_eval run with the bundled tasks (default --model retrieval-head-hf)",
        description="Every argument is passed to `lm_eval run`; the bundled tasks need no --include_path. A first "
        "argument ending in .yaml is a run config (lm_eval --config), e.g. configs/smollm2-135m.yaml.",
    )
    run.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    heads = sub.add_parser(
        "heads", help="rank the heads of a head-score file, or compare several",
        description="One file: its ranking. Two files (A --compare B, or A B --compare): both top lists side by side, "
        "top-k overlap and Spearman. Three or more (A B C --compare): each file's top heads, then the top-10 and "
        "top-20 overlap and the Spearman correlation of every pair, as Markdown tables.",
    )
    heads.add_argument("file", nargs="*", help="head_score/<model>.json, head_score/<model>.<score>.json, ...")
    heads.add_argument("--top", type=int, default=10, help="how many heads to show (default 10)")
    heads.add_argument("--compare", nargs="*", metavar="FILE",
                       help="compare the files given (and any after the flag): top-k overlap and Spearman")
    approx = sub.add_parser(
        "approx",
        help="the approximation analysis with the original check_retrieved_perf.py flags",
        description="Runs ret-approx-hf through lm_eval; unknown flags are passed on to `lm_eval run`.",
    )
    approx.add_argument("--pretrained", default="smollm2-135m")
    approx.add_argument("--model_type", default="ret-approx-hf", help="a registered RetApproxLM (subclass) name")
    approx.add_argument("--tasks", default="retrieval_ppl_en")
    approx.add_argument("--batch", type=int, default=1, help="batch size")
    approx.add_argument("--limit", type=float, default=None)
    approx.add_argument("--topk", default="10", help="keys per query (10), or a share of each query's visible keys (5%%)")
    approx.add_argument("--layerwise_topk_analysis", action="store_true", help="no error propagation across layers")
    approx.add_argument("--approx", default="exact_topk", help="exact_topk, simhash, or package.module:function")
    approx.add_argument(
        "--approx_args", default="", help="the method's parameters, name:value;name:value (e.g. bits:8 for simhash)"
    )
    approx.add_argument("--base_attn", default="sdpa")
    approx.add_argument("--model_args", default="", help="more model_args, comma-separated")
    approx.add_argument("--output_path", default="results/approx")
    compare = sub.add_parser("compare", help="per-layer side-by-side of two ret-approx-hf runs, with deltas")
    compare.add_argument("run_a", help="a run folder (with recall_stats.json) or the JSON file")
    compare.add_argument("run_b")
    compare.add_argument("--output_dir", default="comparison", help="where comparison.md and the delta heatmap go")
    sweep = sub.add_parser("mask-sweep", help="NIAH accuracy with each file's top-K vs K random heads masked")
    sweep.add_argument("--model_args", default="pretrained=smollm2-135m")
    sweep.add_argument("--head_scores", required=True, nargs="+", metavar="FILE",
                       help="head-score files of this model, one per scoring method (head_score/<model>.json, "
                            "head_score/<model>.<score>.json)")
    sweep.add_argument("--ks", default="0,5,10,20,30", help="comma-separated K values")
    sweep.add_argument("--tasks", default="niah_retrieval_heads_en")
    sweep.add_argument("--metadata", default=None, help="the NIAH grid, as for lm_eval")
    sweep.add_argument("--seeds", default=None, help="comma-separated seeds: one random draw of K heads each (0,1,2)")
    sweep.add_argument("--seed", type=int, default=None, help="one seed of the random heads (default 0)")
    sweep.add_argument("--mask_mode", default="uniform", choices=["uniform", "zero"])
    sweep.add_argument("--limit", type=float, default=None)
    sweep.add_argument("--use_cache", default=None, metavar="PATH",
                       help="as lm_eval's: a rerun after an interruption skips every document already answered")
    sweep.add_argument("--output_path", default=None, help="default results/mask-sweep-<model>")
    board = sub.add_parser("leaderboard", help="every approximation x budget end to end: quality, cost, task metrics")
    board.add_argument("--model_args", default="pretrained=smollm2-135m")
    board.add_argument("--methods", default="streaming,h2o,snapkv,quest,loki,sparq,magicpig,ivf,simhash,exact_topk",
                       help="comma-separated approx= names")
    board.add_argument("--budgets", default="32,128",
                       help="comma-separated budgets: keys per query (128) or shares of each query's visible keys (5%%)")
    board.add_argument("--tasks", default="retrieval_ppl_en")
    board.add_argument("--metadata", default=None, help="task metadata (e.g. the NIAH grid), as for lm_eval")
    board.add_argument("--limit", type=float, default=None)
    board.add_argument("--approx_args", nargs="*", metavar="METHOD=ARGS", help="e.g. quest=page_size:8 loki=rank:16")
    board.add_argument("--use_cache", action="store_true", help="read back runs already finished instead of rerunning")
    board.add_argument("--output_path", default="results/leaderboard")
    plot = sub.add_parser("plot", help="NIAH heatmaps (from --log_samples output) and head-score heatmaps")
    from .report.niah_plot import add_plot_arguments

    add_plot_arguments(plot)
    from .original_cli import add_detect_arguments, add_mask_arguments

    detect = sub.add_parser(
        "detect",
        help="retrieval-head detection with the original retrieval_head_detection.py flags",
        description="Runs retrieval-head-hf on the bundled NIAH task over the original's grid (20 lengths from --s "
        "to --e, 10 depths) and prints the lm_eval command first; unknown flags are passed on to `lm_eval run`.",
    )
    add_detect_arguments(detect)
    mask = sub.add_parser(
        "mask",
        help="NIAH with heads masked, with the original needle_in_haystack_with_mask.py flags",
        description="Runs retrieval-head-hf with mask_topk= (or mask_random= for a negative --mask_topk) over the "
        "original's grid and prints the lm_eval command first; unknown flags are passed on to `lm_eval run`.",
    )
    add_mask_arguments(mask)
    sub.add_parser("tasks-dir", help="print the folder of the bundled tasks (for lm_eval --include_path)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv[:1] == ["run"]:
        command, rest = "run", argv[1:]
    else:
        namespace, rest = parser.parse_known_args(argv)
        command = namespace.command
        if rest and command not in ("approx", "detect", "mask"):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if command == "run":
            return _run(rest)
        if command == "approx":
            return _approx(namespace, rest)
        if command == "detect":
            return _detect(namespace, rest)
        if command == "mask":
            return _mask(namespace, rest)
        if command == "compare":
            return _compare(namespace)
        if command == "mask-sweep":
            return _mask_sweep(namespace)
        if command == "leaderboard":
            return _leaderboard(namespace)
        if command == "plot":
            from .report.niah_plot import run_plot

            return run_plot(namespace)
        if command == "tasks-dir":
            print(tasks_dir())
            return 0
        return _heads(namespace)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
