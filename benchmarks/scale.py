"""How detection and the analysed forward scale with context length, against plain HF and the naive L x L analysis.

Why: the original retrieval-head and top-k tools asked eager attention for `output_attentions=True`, which keeps an
L x L matrix per head and layer; that grows quadratically and is what stops them at long contexts. This plugin's
claim is that its probes cost a bounded factor over what the model costs anyway. This script puts the three side
by side for SmolLM2-135M on CPU, one row per context length L, all in one process:

* detection: `RetrievalHeadLM.trace_document` on a real English NIAH document of about L tokens, against plain
  greedy `model.generate` (the unhooked model on sdpa) making the same number of new tokens from the same prompt;
* analysed forward: one `ret-approx-hf` forward (exact top-k, k=10) of a 1 x L prompt with full logits, against
  the plain forward (unhooked sdpa) of the same prompt;
* naive: eager attention with `output_attentions=True` over the same prompt, up to `--naive-max`; above it the row
  shows what its attention matrices alone would take (layers x heads x L x L x bytes per element).

How to read it: every "s / MiB" cell is wall time and peak resident memory above the level just before the call
(sampled every 5 ms, see approx_overhead.measure; with --repeats N the least of N); each "ratio" cell is time
ratio / memory ratio against the plain baseline of the same row. A flat ratio across rows means the cost scales
like the model; a growing one means it does not. Memory ratios against baselines under 1 MiB read "n/a", and
short rows are noisy on a shared CPU. The forward prompts are seeded random token ids of exactly L tokens (cost
does not depend on content); NIAH documents are capped at max_length - max_new_tokens (8142 tokens for SmolLM2),
and the "doc tokens" column says what was run. "new tokens" are summed over --docs documents, times too.

    python benchmarks/scale.py [--lengths 1024,2048,4096,8192] [--docs 1] [--naive-max 2048] [--repeats 1]
"""

from __future__ import annotations

import os
import sys

if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # as approx_overhead.py: freed large blocks leave the RSS
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
from collections.abc import Callable  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402
import torch  # noqa: E402
from approx_overhead import measure, naive_bytes, unhooked  # noqa: E402  (benchmarks/ is sys.path[0] as a script)

Cost = tuple[float, float]  # (seconds, peak extra MiB)
REPEATS = 1  # set from --repeats


def best(fn: Callable[[], Any]) -> Cost:
    """`measure` REPEATS times; the least time and the least peak (noise only ever adds to either)."""
    costs = [measure(fn) for _ in range(REPEATS)]
    return min(c[0] for c in costs), min(c[1] for c in costs)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def counting_decode_steps(lm: Any) -> list[int]:
    """Make `lm._decode_with_probe` record how many tokens each call generated (the list it returns fills up)."""
    steps: list[int] = []
    original = lm._decode_with_probe

    def counting(*args: Any, **kwargs: Any) -> list[int]:
        generated = original(*args, **kwargs)
        steps.append(len(generated))
        return generated

    lm._decode_with_probe = counting
    return steps


def detection_costs(lm: Any, doc: dict, steps: list[int]) -> tuple[Cost, Cost, int]:
    """(generate cost, trace_document cost, new tokens) for one document."""
    gen_kwargs = {"until": ["\n"]}
    before = len(steps)
    detect = best(lambda: lm.trace_document(doc["input"], doc, gen_kwargs))
    if len(steps) == before:  # trace_document skips (with a warning) a prompt that does not fit max_length
        raise SystemExit(f"trace_document decoded nothing for a {doc['length']}-token document; see the log above")
    new_tokens = steps[-1]
    ids = torch.tensor([lm.tokenizer(doc["input"], add_special_tokens=bool(lm.add_bos_token))["input_ids"]])

    def plain() -> None:
        lm.model.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=lm.tokenizer.eos_token_id,
        )

    with unhooked(lm.model, lm.hook_state, "sdpa"), torch.inference_mode():
        generate = best(plain)
    return generate, detect, new_tokens


def forward_cost(model: Any, state: Any, ids: torch.Tensor, attn: str | None, **kwargs: Any) -> Cost:
    """One full-logits forward of `ids` on `attn` (None: hooked, with the model's probes)."""
    with unhooked(model, state, attn) if attn else nullcontext(), torch.inference_mode():
        return best(lambda: model(ids, **kwargs))


def resident_mib() -> float:
    """This process's resident memory now, the base that every cell's peak is measured above."""
    return psutil.Process().memory_info().rss / 2**20


def cell(cost: Cost) -> str:
    return f"{cost[0]:.2f} s / {cost[1]:.0f} MiB"


def ratio(cost: Cost, base: Cost) -> str:
    memory = f"{cost[1] / base[1]:.2f}x" if base[1] >= 1.0 else "n/a"
    return f"{cost[0] / base[0]:.2f}x / {memory}"


def add(a: Cost, b: Cost) -> Cost:
    """Documents of one length: times add up, the peak is the largest."""
    return a[0] + b[0], max(a[1], b[1])


def parse_lengths(text: str) -> list[int]:
    return [int(part) for part in text.replace(" ", ",").split(",") if part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=parse_lengths, default=[1024, 2048, 4096, 8192], help="comma-separated")
    parser.add_argument("--docs", type=int, default=1, help="NIAH documents per length (different needles, depths)")
    parser.add_argument("--naive-max", type=int, default=2048, help="longest context the naive L x L run gets")
    parser.add_argument("--repeats", type=int, default=1, help="measure each call this many times, keep the best")
    args = parser.parse_args()
    global REPEATS
    REPEATS = max(1, args.repeats)

    from lm_eval_retrieval.haystack import build_document, get_needles, load_haystack_text, split_sentences
    from lm_eval_retrieval.models.head_trace import RetrievalHeadLM
    from lm_eval_retrieval.models.ret_approx import RetApproxLM

    log("loading SmolLM2-135M twice (retrieval-head-hf, ret-approx-hf k=10) ...")
    detector = RetrievalHeadLM(pretrained="smollm2-135m", output_path="/tmp/lmr-bench")
    analyser = RetApproxLM(pretrained="smollm2-135m", topk=10, output_path="/tmp/lmr-bench")
    model, state, config = analyser.model, analyser.hook_state, analyser.model.config
    steps = counting_decode_steps(detector)
    sentences = split_sentences(load_haystack_text("en"), "en")
    needles = get_needles("en")
    doc_cap = detector.max_length - detector.max_new_tokens

    def make_doc(length: int, i: int) -> dict:
        depth = 100.0 * (i + 0.5) / args.docs
        return build_document(detector.tokenizer, sentences, needles[i % len(needles)], min(length, doc_cap), depth)

    log("warm-up ...")
    detection_costs(detector, make_doc(256, 0), steps)
    warm = torch.randint(100, config.vocab_size - 100, (1, 64))
    for attn in ("sdpa", None):
        forward_cost(model, state, warm, attn)

    print(
        f"torch threads: {torch.get_num_threads()}, dtype {model.dtype}, naive run up to L={args.naive_max}; "
        f"resident before the runs (both models loaded): {resident_mib():.0f} MiB, add a cell's MiB for its total"
    )
    print("| L | doc tokens | new tokens | generate | detection | detection ratio | plain forward | analysed forward "
          "| analysed ratio | naive L x L | naive ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    generator = torch.Generator().manual_seed(0)
    for length in args.lengths:
        generate, detect, new_tokens, doc_tokens = (0.0, 0.0), (0.0, 0.0), 0, 0
        for i in range(args.docs):
            log(f"L={length}: detection, document {i + 1}/{args.docs} ...")
            doc = make_doc(length, i)
            g, d, n = detection_costs(detector, doc, steps)
            generate, detect, new_tokens, doc_tokens = add(generate, g), add(detect, d), new_tokens + n, doc["length"]
        ids = torch.randint(100, config.vocab_size - 100, (1, length), generator=generator)
        log(f"L={length}: plain and analysed forward ...")
        plain = forward_cost(model, state, ids, "sdpa")
        analysed = forward_cost(model, state, ids, None)
        estimate = naive_bytes(config, model.dtype, length) / 2**30
        naive, naive_ratio = f"skipped (est. {estimate:.1f} GiB)", "skipped"
        if length <= args.naive_max:
            log(f"L={length}: naive eager output_attentions=True (est. {estimate:.1f} GiB) ...")
            cost = forward_cost(model, state, ids, "eager", output_attentions=True)
            naive, naive_ratio = cell(cost), ratio(cost, plain)
        print(
            f"| {length} | {doc_tokens} | {new_tokens} | {cell(generate)} | {cell(detect)} | {ratio(detect, generate)} "
            f"| {cell(plain)} | {cell(analysed)} | {ratio(analysed, plain)} | {naive} | {naive_ratio} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
