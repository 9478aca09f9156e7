"""The original Retrieval Head scripts' command lines, each a thin mapping onto the `lm_eval` run it stands for.

`lm-eval-retrieval detect` takes the flags of `retrieval_head_detection.py` (and, with `--multiling`, of
`retrieval_head_multiling_detection.py`), `lm-eval-retrieval mask` those of `needle_in_haystack_with_mask.py`. Each
prints the `lm_eval` command it runs before running it, so a user of the original types what they know and learns
the lm_eval form (as `approx` maps `check_retrieved_perf.py`).

The grid is the original's (`LLMNeedleHaystackTester.__init__` of all three scripts in the multilingual fork whose
README these commands follow, github.com/shaswatpatel123/Retrieval_Head): 20 context lengths
`np.round(np.linspace(s, e, num=20, endpoint=True)).astype(int)` and 10 depths
`np.round(np.linspace(0, 100, num=10, endpoint=True)).astype(int)`; `run_test` then keeps the lengths inside
[s, e], which is all of them. A length of 0 (from `--s 0`) holds no haystack and is dropped, and a length that
rounding repeats (`--s` close to `--e`) runs once. (The first repository's masking script, nightdessert/Retrieval_Head,
used 40 lengths; the fork's, which has `--language` and `--wandb`, uses 20 like its detection.)

No torch here: the mapping is built and printed before anything heavy loads.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
from collections.abc import Sequence

import numpy as np

from .errors import UserInputError
from .haystack.languages import check_language

CONTEXT_INTERVALS = 20
DEPTH_INTERVALS = 10
WANDB_PROJECT = "retrieval-heads"
INCLUDE_PATH = "$(lm-eval-retrieval tasks-dir)"

# (needle + question language, haystack language, answer language) -> the bundled task that is exactly that run
NAMED_TASKS = {
    ("en", "en", "en"): "niah_retrieval_heads_en",
    ("zh", "zh", "zh"): "niah_retrieval_heads_zh",
    ("de", "de", "de"): "niah_retrieval_heads_de",
    ("en", "zh", "en"): "niah_retrieval_heads_en_in_zh",
    ("en", "de", "en"): "niah_retrieval_heads_en_in_de",
    ("en", "en", "zh"): "niah_translation_heads_en_zh",
    ("en", "en", "de"): "niah_translation_heads_en_de",
}
# flags `detect` / `mask` set themselves: given again for lm_eval they would silently override the mapping
RESERVED = ("--model", "--tasks", "-t", "--include_path")


def original_grid(s: int, e: int) -> tuple[list[int], list[int]]:
    """The original's context lengths between `s` and `e` and its needle depths (see the module docstring)."""
    if s < 0:
        raise UserInputError(f"--s must be a length in tokens, 0 or more; got {s}")
    if e < s:
        raise UserInputError(f"--e ({e}) is below --s ({s}), where the original ran nothing; give e.g. --s 0 --e 30000")
    lengths = np.round(np.linspace(s, e, num=CONTEXT_INTERVALS, endpoint=True)).astype(int)
    depths = np.round(np.linspace(0, 100, num=DEPTH_INTERVALS, endpoint=True)).astype(int)
    kept = list(dict.fromkeys(int(n) for n in lengths if s <= n <= e and n > 0))
    if not kept:
        raise UserInputError(f"--e must be a positive length in tokens (a prompt needs a haystack); got {e}")
    return kept, [int(d) for d in depths]


def niah_task(language: str, haystack_language: str, answer_language: str) -> tuple[str, dict[str, str]]:
    """The bundled task for a language triple, and the `--metadata` language keys it needs (none for a named task)."""
    triple = (language, haystack_language, answer_language)
    if triple in NAMED_TASKS:
        return NAMED_TASKS[triple], {}
    keys = ("language", "haystack_language", "answer_language")
    return "niah_retrieval_heads_en", dict(zip(keys, triple))


def result_name(pretrained: str) -> str:
    """What the run names its files after (`head_score/<name>.json`): an alias itself, else the path's last part."""
    from .models.aliases import ALIASES, _name_of

    return pretrained if pretrained in ALIASES else _name_of(pretrained)


# --------------------------------------------------------------------------------------------------------------------
# the flags


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_path", default=None, help="the model: a hub id, a local folder, a .gguf or an alias")
    parser.add_argument("-s", "--s", "--s_len", dest="s_len", metavar="N", default=None,
                        help="shortest context length in tokens (the original's --s_len)")
    parser.add_argument("-e", "--e", "--e_len", dest="e_len", metavar="N", default=None,
                        help="longest context length; 20 lengths from --s to --e, as the original")
    parser.add_argument("--language", default="en", help="needle and question language: en, zh, de")
    parser.add_argument("-hl", "--haystack_language", default=None, help="haystack language (default --language)")
    parser.add_argument("--quantize", action="store_true", help="4-bit NF4, bitsandbytes (model arg quantize=4bit)")
    parser.add_argument("--wandb", action="store_true",
                        help=f"log to Weights & Biases: lm_eval's own --wandb_args project={WANDB_PROJECT}")
    parser.add_argument("--model_args", default="", help="more model_args, comma-separated (e.g. dtype=bfloat16)")
    parser.add_argument("--output_path", default=None, help="where results go (default under results/<lang><hlang>)")
    # the original's flags that have no counterpart: each is a one-line error naming what to use instead
    parser.add_argument("--model_name", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model_name_suffix", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model_provider", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--api_key", default=None, help=argparse.SUPPRESS)


def add_detect_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common_arguments(parser)
    parser.add_argument("--multiling", action="store_true",
                        help="retrieval_head_multiling_detection.py: needle, question and haystack in --language, "
                             "the answer in --haystack_language (translation heads)")


def add_mask_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common_arguments(parser)
    parser.add_argument("--mask_topk", default="0", metavar="K",
                        help="mask the top K heads of the head-score file; a negative K masks -K random heads outside "
                             "the top -K (the original's convention); 0 masks nothing")
    parser.add_argument("--head_scores", default=None,
                        help="the head-score file to rank (default: where `detect` with the same flags wrote it, "
                             "results/<language><haystack_language>/head_score/<model>.json)")
    parser.add_argument("--mask_lang", default=None, help=argparse.SUPPRESS)


def _int_flag(value: str | None, flag: str, example: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise UserInputError(f"{flag} must be a whole number, e.g. {flag} {example}; got {value!r}") from None


def _refuse_unsupported(args: argparse.Namespace) -> None:
    if args.model_name_suffix is not None:
        raise UserInputError(
            "--model_name_suffix renamed the original's head-score file; here give --output_path DIR to keep runs apart"
        )
    if args.model_name is not None:
        raise UserInputError("--model_name was not used by the original (it read --model_path); give --model_path only")
    if args.model_provider not in (None, "LLaMA") or args.api_key is not None:
        raise UserInputError(
            "--model_provider/--api_key select API models, whose attention cannot be read; give a local or hub "
            "--model_path (for API accuracy alone use lm_eval's own API models, e.g. --model openai-chat-completions)"
        )
    if getattr(args, "mask_lang", None) is not None:
        raise UserInputError("--mask_lang is not supported; give --head_scores FILE, the head-score file to mask from")
    if args.model_path in (None, ""):
        raise UserInputError("--model_path is required: the model to test, e.g. --model_path Qwen/Qwen2.5-3B-Instruct")
    if args.s_len is None or args.e_len is None:
        raise UserInputError("--s and --e are required: the shortest and longest context length, e.g. --s 0 --e 30000")


def _grid_and_languages(args: argparse.Namespace) -> tuple[list[int], list[int], str, str]:
    lengths, depths = original_grid(_int_flag(args.s_len, "--s", "0"), _int_flag(args.e_len, "--e", "30000"))
    language = check_language(args.language, "--language")
    haystack = check_language(args.haystack_language or language, "--haystack_language")
    return lengths, depths, language, haystack


def _model_args(args: argparse.Namespace, *more: str) -> str:
    pretrained = str(args.model_path)
    if "," in pretrained:
        raise UserInputError(f"--model_path {pretrained!r} holds a comma, which lm-eval's model_args cannot carry")
    parts = [f"pretrained={pretrained}", *(["quantize=4bit"] if args.quantize else []), *more]
    extra = str(args.model_args or "").strip(", ")
    return ",".join([*parts, extra] if extra else parts)


def _lm_eval_args(
    model_args: str, task: str, metadata: dict, output_path: str, wandb: bool, passthrough: Sequence[str]
) -> list[str]:
    rest = list(passthrough)
    for flag in RESERVED:
        if any(word == flag or word.startswith(flag + "=") for word in rest):
            raise UserInputError(
                f"{flag} is set from the original's flags here; for another run use `lm-eval-retrieval run {flag} ...`"
            )
    for position, word in enumerate(rest):  # a --metadata of the user's adds to (and overrides) the grid
        if word == "--metadata" or word.startswith("--metadata="):
            text = word.partition("=")[2] if "=" in word else (rest[position + 1] if position + 1 < len(rest) else "")
            try:
                theirs = json.loads(text)
            except json.JSONDecodeError:
                theirs = None
            if not isinstance(theirs, dict):
                raise UserInputError(f"--metadata must be a JSON object ('{{\"needles_per_cell\":2}}'), not {text!r}")
            metadata = {**metadata, **theirs}
            del rest[position: position + (1 if "=" in word else 2)]
            break
    words = [
        "--model", "retrieval-head-hf", "--model_args", model_args, "--tasks", task,
        "--metadata", json.dumps(metadata, separators=(",", ":"), ensure_ascii=False),
        "--output_path", output_path, "--log_samples",
    ]
    if wandb and not any(word == "--wandb_args" or word.startswith("--wandb_args=") for word in rest):
        words += ["--wandb_args", f"project={WANDB_PROJECT}"]
    return words + rest


def detect_lm_eval_args(args: argparse.Namespace, passthrough: Sequence[str] = ()) -> list[str]:
    """`retrieval_head_detection.py` / `retrieval_head_multiling_detection.py` flags -> `lm_eval run` arguments."""
    _refuse_unsupported(args)
    lengths, depths, language, haystack = _grid_and_languages(args)
    if args.multiling:
        if haystack == language:
            raise UserInputError(
                "--multiling scores translation heads: the answer is in --haystack_language, so give one other than "
                f"--language {language}, e.g. --language en --haystack_language zh"
            )
        triple, tag = (language, language, haystack), f"{language}{haystack}_translation"
    else:
        triple, tag = (language, haystack, language), f"{language}{haystack}"
    task, language_keys = niah_task(*triple)
    metadata = {"context_lengths": lengths, "depths": depths, **language_keys}
    output = args.output_path or os.path.join("results", tag)
    return _lm_eval_args(_model_args(args), task, metadata, output, args.wandb, passthrough)


def mask_head_scores(args: argparse.Namespace) -> str:
    """The head-score file `mask` ranks: --head_scores, else where `detect` with the same flags wrote it."""
    if args.head_scores:
        return str(args.head_scores)
    language = check_language(args.language, "--language")
    haystack = check_language(args.haystack_language or language, "--haystack_language")
    return os.path.join("results", f"{language}{haystack}", "head_score", f"{result_name(str(args.model_path))}.json")


def mask_lm_eval_args(args: argparse.Namespace, passthrough: Sequence[str] = ()) -> list[str]:
    """`needle_in_haystack_with_mask.py` flags -> `lm_eval run` arguments."""
    _refuse_unsupported(args)
    lengths, depths, language, haystack = _grid_and_languages(args)
    k = _int_flag(args.mask_topk, "--mask_topk", "8")
    task, language_keys = niah_task(language, haystack, language)
    metadata = {"context_lengths": lengths, "depths": depths, **language_keys}
    name = result_name(str(args.model_path))
    head_scores = mask_head_scores(args)
    if "," in head_scores:
        raise UserInputError(f"--head_scores {head_scores!r} holds a comma, which lm-eval's model_args cannot carry")
    if k > 0:
        more, folder = [f"mask_topk={k}", f"head_scores={head_scores}"], f"{name}_block_top{k}"
    elif k < 0:
        more, folder = [f"mask_random={-k}", f"head_scores={head_scores}"], f"{name}_block_random{-k}"
    else:
        more, folder = [], f"{name}_unmasked"
    output = args.output_path or os.path.join("results", f"{language}{haystack}", folder)
    written = os.path.join(output, "head_score", f"{name}.json")
    if k != 0 and os.path.abspath(written) == os.path.abspath(head_scores):
        raise UserInputError(
            f"--output_path {output} would overwrite the head-score file being masked ({head_scores}) with the masked "
            "run's scores; choose another --output_path"
        )
    return _lm_eval_args(_model_args(args, *more), task, metadata, output, args.wandb, passthrough)


# --------------------------------------------------------------------------------------------------------------------
# before the run


def shell_form(lm_eval_args: Sequence[str]) -> str:
    """The plain `lm_eval` command line of a mapping, as a user would type it (the task folder as a command)."""
    words = ["lm_eval", *lm_eval_args]
    after_tasks = words.index("--tasks") + 2
    words[after_tasks:after_tasks] = ["--include_path", INCLUDE_PATH]
    return " ".join(word if word == INCLUDE_PATH else shlex.quote(word) for word in words)


def check_wandb(lm_eval_args: Sequence[str]) -> None:
    """lm-eval logs to W&B itself (`--wandb_args`), but only warns when the package is missing: fail first instead."""
    if "--wandb_args" in lm_eval_args and importlib.util.find_spec("wandb") is None:
        raise UserInputError("--wandb logs through lm_eval's --wandb_args, which needs wandb: pip install wandb")


def check_lengths_fit(args: argparse.Namespace) -> None:
    """--e against the model's maximum, before the weights load (the task would refuse it later, naming
    context_lengths, a key the user of the original never typed)."""
    if "max_length" in str(args.model_args or ""):
        return  # the user's own cap: the task checks against it
    from .haystack.grid import GENERATION_ROOM, load_tokenizer_and_max_length

    _, model_max, name = load_tokenizer_and_max_length(str(args.model_path))
    limit = model_max - GENERATION_ROOM
    e = _int_flag(args.e_len, "--e", "30000")
    if e > limit:
        raise UserInputError(
            f"--e {e} is longer than {name} can take ({model_max} tokens, {GENERATION_ROOM} kept for the answer); "
            f"use --e {limit} or less"
        )
