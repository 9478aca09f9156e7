"""Each built-in approximation's layerwise analysis against the `exact_topk` analysis, one forward of L tokens.

The same prompt goes through the analysed model once per method (k = --topk, layerwise, so every method sees the same
inputs); the ratio is the method's time over exact_topk's, measured in this process, best of --repeats.

    python benchmarks/methods_overhead.py [--length 2048] [--topk 32] [--methods streaming h2o ...]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from generate_overhead import haystack_prompts  # benchmarks/ is sys.path[0] when run as a script

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from lm_eval_retrieval.attention.approx import BUILTIN
    from lm_eval_retrieval.models.ret_approx import RetApproxLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=[m for m in BUILTIN if m != "exact_topk"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    lm = RetApproxLM(pretrained="smollm2-135m", topk=args.topk, output_path="/tmp/lmr-bench-methods")
    ids = lm.tokenizer(haystack_prompts(lm.tokenizer, args.length, 1)[0], return_tensors="pt").input_ids
    ids = ids[:, : args.length]

    def timed(method: str) -> float:
        lm.configure(method, args.topk)
        with torch.no_grad():
            lm.model(ids[:, :256])  # the method's own warm-up (its kernels load from numba's cache or compile here)
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            with torch.no_grad():
                lm.model(ids)
            best = min(best, time.perf_counter() - start)
        return best

    baseline = timed("exact_topk")
    print(f"torch threads: {torch.get_num_threads()}, {ids.shape[1]} tokens, k={args.topk}, layerwise")
    print("| approx | analysed forward (s) | vs exact_topk analysis |")
    print("|---|---:|---:|")
    print(f"| exact_topk | {baseline:.2f} | 1.00x |", flush=True)
    for method in args.methods:
        seconds = timed(method)
        print(f"| {method} | {seconds:.2f} | {seconds / baseline:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
