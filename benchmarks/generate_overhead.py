"""`generate_until` under `ret-approx-hf` against lm-eval's plain `hf`, per generated token, in one process.

The same lm-eval `generate_until` requests (haystack prompts of about L tokens, greedy, up to `--max_gen_toks` new
tokens each) go through HFLM's own `generate_until` twice per approximation: once as plain `hf` runs them (the
unhooked model on sdpa, no probe) and once as `ret-approx-hf` runs them (every attention call of the prefill and of
each decode step analysed, layerwise). The prefill is included, as in a real evaluation. Each run's generated tokens
are counted from the model's `generate` output, so runs that stop at different lengths are compared per token, not
by wall time alone. Writing the reports (tables, PNGs) happens once per evaluation and is timed apart.

    python benchmarks/generate_overhead.py [--lengths 1024 4096] [--prompts 3] [--approx exact_topk simhash]
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from approx_overhead import unhooked  # benchmarks/ is sys.path[0] when run as a script

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def haystack_prompts(tokenizer: Any, length: int, count: int) -> list[str]:
    """`count` different prompts of exactly `length` tokens of haystack text, cut mid-passage, for the model to
    continue (an instruction-tuned model asked a question may stop after a handful of tokens)."""
    from lm_eval_retrieval.haystack import load_haystack_text

    words = load_haystack_text("en").split()
    prompts = []
    for i in range(count):
        start = (i * 7919) % max(1, len(words) - 8 * length)
        text = " ".join(words[start : start + length])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
        prompts.append(tokenizer.decode(ids))
    return prompts


@contextmanager
def counting_tokens(model: Any, counts: list[int]) -> Iterator[None]:
    """Record how many tokens each `model.generate` call added (prompt tokens excluded)."""
    original = model.generate

    def generate(*args: Any, **kwargs: Any) -> torch.Tensor:
        output = original(*args, **kwargs)
        prompt = kwargs.get("input_ids", args[0] if args else None)
        counts.append(int(output.shape[0] * (output.shape[1] - prompt.shape[1])))
        return output

    model.generate = generate
    try:
        yield
    finally:
        del model.generate


def timed_generate(lm: Any, requests: list, analysed: bool) -> tuple[float, int, list[str]]:
    """(seconds, generated tokens, responses) of HFLM's generate_until over `requests`."""
    from lm_eval.models.huggingface import HFLM

    counts: list[int] = []
    with counting_tokens(lm.model, counts):
        start = time.perf_counter()
        if analysed:
            responses = HFLM.generate_until(lm, requests, disable_tqdm=True)
        else:
            with unhooked(lm.model, lm.hook_state, "sdpa"):
                responses = HFLM.generate_until(lm, requests, disable_tqdm=True)
        elapsed = time.perf_counter() - start
    return elapsed, sum(counts), responses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max_gen_toks", type=int, default=64)
    parser.add_argument("--approx", nargs="+", default=["exact_topk", "simhash"])
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument(
        "--repeats", type=int, default=1,
        help="time each run this many times (plain and the methods in turn), keep the best",
    )
    args = parser.parse_args()

    from lm_eval.api.instance import Instance

    from lm_eval_retrieval.attention.approx import resolve_approx
    from lm_eval_retrieval.models.ret_approx import RetApproxLM

    lm = RetApproxLM(pretrained="smollm2-135m", topk=args.topk, output_path="/tmp/lmr-bench-generate")
    gen_kwargs = {"until": ["\n\n\n"], "max_gen_toks": args.max_gen_toks, "do_sample": False}
    warm = [Instance("generate_until", {}, ("Hello there.", dict(gen_kwargs, max_gen_toks=4)), 0)]
    timed_generate(lm, warm, analysed=False)
    timed_generate(lm, warm, analysed=True)

    print(f"torch threads: {torch.get_num_threads()}, k={args.topk}, layerwise, {args.prompts} prompts per length, "
          f"up to {args.max_gen_toks} new tokens each, prefill included")
    print("| prompt tokens | approx | hf tokens | hf (s) | hf ms/token | analysed tokens | analysed (s) "
          "| analysed ms/token | ratio per token | reports (s) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        prompts = haystack_prompts(lm.tokenizer, length, args.prompts)
        requests = [Instance("generate_until", {}, (p, dict(gen_kwargs)), i) for i, p in enumerate(prompts)]
        # The first plain run at a new length pays one-off costs (the allocator growing to the new sizes), which
        # would flatter whichever method is measured against it: one untimed run first. The plain runs do not
        # depend on the method, so every method is measured against the best of all of them, and each repeat runs
        # plain and every method in turn, so that a slow spell of a shared machine hits them all.
        timed_generate(lm, requests[:1], analysed=False)
        plain = (float("inf"), 0, [])
        probed = {approx: (float("inf"), 0, []) for approx in args.approx}
        reports = {}
        for _ in range(args.repeats):
            plain = min(plain, timed_generate(lm, requests, analysed=False), key=lambda r: r[0])
            for approx in args.approx:
                lm.set_approx(resolve_approx(approx)[1], approx)
                probed[approx] = min(probed[approx], timed_generate(lm, requests, analysed=True), key=lambda r: r[0])
                start = time.perf_counter()
                lm.write_reports()
                reports[approx] = time.perf_counter() - start
        for approx in args.approx:
            best = probed[approx]
            plain_per, probed_per = plain[0] / max(plain[1], 1), best[0] / max(best[1], 1)
            print(
                f"| {length} | {approx} | {plain[1]} | {plain[0]:.2f} | {1000 * plain_per:.1f} | {best[1]} "
                f"| {best[0]:.2f} | {1000 * probed_per:.1f} | {probed_per / plain_per:.2f}x | {reports[approx]:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
