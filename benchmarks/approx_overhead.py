"""Time and peak memory of the analysed forward (`ret-approx-hf`, exact top-k) against a plain forward, on SmolLM2.

Same process, same prompt, full logits (what lm-eval's loglikelihood asks for). For short contexts it also runs the
naive analysis the original tool did: eager attention with `output_attentions=True`, which materialises an L x L
matrix per head and layer. Peak memory is the process RSS above its level just before the call, sampled every 5
ms; glibc is told to return large blocks to the system at once (the script re-executes itself with
MALLOC_MMAP_THRESHOLD_ set), so one call's peak does not hide inside the last one's freed heap.

    python benchmarks/approx_overhead.py [--lengths 1024 2048 4096 8192] [--topk 10] [--repeats 2]

With --repeats N the plain and analysed forwards alternate N times and each keeps its least time (noise on a shared
CPU only ever adds time) and least peak.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import psutil  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
NAIVE_LIMIT_BYTES = 6 * 2**30  # skip the naive L x L run where its attention matrices alone would exceed this


def measure(fn) -> tuple[float, float]:
    """(seconds, peak extra RSS in MiB) of one call."""
    process = psutil.Process()
    base = process.memory_info().rss
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    return elapsed, (max(peak, process.memory_info().rss) - base) / 2**20


@contextmanager
def unhooked(model, state, attn: str) -> Iterator[None]:
    """Run `model` without the plugin's probes on the `attn` backend (its own hooked name keeps the hook, probe-free)."""
    from lm_eval_retrieval.attention.hook import probes_replaced

    hooked = model.config._attn_implementation
    model.set_attn_implementation(attn)
    try:
        with probes_replaced(state, []):
            yield
    finally:
        model.set_attn_implementation(hooked)


def naive_bytes(config, dtype: torch.dtype, length: int) -> float:
    """What `output_attentions=True` keeps: one L x L matrix per layer and head."""
    return config.num_hidden_layers * config.num_attention_heads * length * length * dtype.itemsize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="alternate plain and analysed N times, keep the best")
    args = parser.parse_args()

    from lm_eval_retrieval.models.ret_approx import RetApproxLM

    lm = RetApproxLM(pretrained="smollm2-135m", topk=args.topk, output_path="/tmp/lmr-bench")
    model, state = lm.model, lm.hook_state
    config = model.config
    print(f"torch threads: {torch.get_num_threads()}, k={args.topk}")
    print("| context | plain (s) | analysed (s) | time ratio | plain peak (MiB) | analysed peak (MiB) | memory ratio "
          "| naive L x L (s) | naive peak (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    generator = torch.Generator().manual_seed(0)
    for length in args.lengths:
        ids = torch.randint(100, config.vocab_size - 100, (1, length), generator=generator)
        with torch.inference_mode():
            model(ids[:, :64])  # warm-up
            plain_runs, probed_runs = [], []
            for _ in range(max(1, args.repeats)):
                with unhooked(model, state, config._attn_implementation):
                    plain_runs.append(measure(lambda: model(ids)))
                probed_runs.append(measure(lambda: model(ids)))
            plain_t, plain_m = min(r[0] for r in plain_runs), min(r[1] for r in plain_runs)
            probed_t, probed_m = min(r[0] for r in probed_runs), min(r[1] for r in probed_runs)
            naive = "skipped (would need {:.0f} GiB)".format(naive_bytes(config, model.dtype, length) / 2**30)
            naive_m = ""
            if naive_bytes(config, model.dtype, length) <= NAIVE_LIMIT_BYTES:
                with unhooked(model, state, "eager"):
                    naive_t, naive_mem = measure(lambda: model(ids, output_attentions=True))
                naive, naive_m = f"{naive_t:.2f}", f"{naive_mem:.0f}"
        print(
            f"| {length} | {plain_t:.2f} | {probed_t:.2f} | {probed_t / plain_t:.2f}x | {plain_m:.0f} | {probed_m:.0f} "
            f"| {probed_m / plain_m:.2f}x | {naive} | {naive_m} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
