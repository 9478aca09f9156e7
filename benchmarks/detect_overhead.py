"""Detection time vs plain greedy `generate`, on SmolLM2, in one process.

For each context length, the same NIAH prompts are answered twice: by `model.generate` (greedy, the same number of
new tokens, on the unhooked backend: the model exactly as transformers runs it) and by `RetrievalHeadLM.trace_document`
(prefill at backend speed, then the retrieval probe on every decode step). The ratio is what detection costs.
`--scores` times detection once per set of head scores given (`copy`, the default, is the plain detection;
`"copy;mass;qr;distant"` all four in one pass), each against the same `generate`.

    python benchmarks/detect_overhead.py [--lengths 1000 2000] [--docs 3] [--repeats 2]
                                         [--scores copy "copy;mass;qr;distant"]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--docs", type=int, default=3, help="documents per length (different needles and depths)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats; the best is kept")
    parser.add_argument("--base_attn", default="sdpa")
    parser.add_argument(
        "--scores", nargs="+", default=["copy"], help='sets of head scores to time, e.g. copy "copy;mass;qr;distant"'
    )
    args = parser.parse_args()

    from lm_eval_retrieval.haystack import build_document, get_needles, load_haystack_text, split_sentences
    from lm_eval_retrieval.metrics.head_scores import parse_scores
    from lm_eval_retrieval.models.head_trace import RetrievalHeadLM

    score_sets = [parse_scores(scores) for scores in args.scores]

    lm = RetrievalHeadLM(pretrained="smollm2-135m", base_attn=args.base_attn, output_path="/tmp/lmr-bench")
    sentences = split_sentences(load_haystack_text("en"), "en")
    needles = get_needles("en")
    print(f"torch threads: {torch.get_num_threads()}, base_attn={args.base_attn}")
    columns = "".join(f" detection {';'.join(names)} (s) | ratio |" for names in score_sets)
    print(f"| context | docs | new tokens | generate (s) |{columns}")
    print("|---:|---:|---:|---:|" + "---:|---:|" * len(score_sets))
    for length in args.lengths:
        docs = [
            build_document(lm.tokenizer, sentences, needles[i % len(needles)], length, 100.0 * i / max(args.docs - 1, 1))
            for i in range(args.docs)
        ]
        plain_times, probe_times, new_tokens = [], [[] for _ in score_sets], 0
        for doc in docs:
            ids = torch.tensor([lm.tokenizer(doc["input"], add_special_tokens=False)["input_ids"]])
            # Detection first, to learn how many tokens the answer takes; generate then makes exactly as many.
            lm.trace_document(doc["input"], doc, {"until": ["\n"]})
            steps = _answer_steps(lm, doc)
            new_tokens += steps

            def plain() -> None:
                hooked = lm.model.config._attn_implementation
                lm.model.set_attn_implementation(args.base_attn)  # the unhooked model, exactly as transformers runs it
                try:
                    with torch.inference_mode():
                        lm.model.generate(
                            ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                            pad_token_id=lm.tokenizer.eos_token_id,
                        )
                finally:
                    lm.model.set_attn_implementation(hooked)

            def detect() -> None:
                lm.trace_document(doc["input"], doc, {"until": ["\n"]})

            plain_times.append(_best_of(plain, args.repeats))
            for times, names in zip(probe_times, score_sets):
                lm.score_names = names
                times.append(_best_of(detect, args.repeats))
        plain_s = sum(plain_times)
        cells = "".join(f" {sum(times):.2f} | {sum(times) / plain_s:.2f}x |" for times in probe_times)
        print(f"| {length} | {len(docs)} | {new_tokens} | {plain_s:.2f} |{cells}")


def _answer_steps(lm, doc) -> int:
    """Decode steps trace_document ran for this document (answer tokens plus the stop token)."""
    encoded = torch.tensor(lm.tokenizer(doc["input"], add_special_tokens=False)["input_ids"])
    from lm_eval_retrieval.models.head_trace import answer_token_span

    span = answer_token_span(
        lm.tokenizer(doc["input"], return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"],
        doc["answer_char_start"], doc["answer_char_end"],
    )
    generated = lm._decode_with_probe(encoded, lm._tracker(encoded, span, doc), lm.max_new_tokens, ["\n"])
    return len(generated)


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) if repeats > 1 else statistics.mean(times)


if __name__ == "__main__":
    main()
