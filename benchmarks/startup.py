"""Start-up of a one-document `lm_eval` detection run: seconds from launch to the first document.

Runs the same command several ways in one script and prints when each reached lm-eval's first request ("Running
generate_until requests" on stderr) and when it finished:

- `cold`: the plugin's caches (converted GGUF, lm-eval's task index) emptied first, as on a fresh machine;
- `warm`: the second run, the case the target is about (<= 10 s to the first document);
- `no index cache`: warm, but with `LMR_TASK_INDEX_CACHE=0`, i.e. lm-eval parsing its own task YAMLs as it does
  without the plugin; the difference is what the task-index cache saves.

    python benchmarks/startup.py [--runs 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIRST_REQUEST = "Running generate_until requests"


def lm_eval_command(output: str) -> list[str]:
    lm_eval = shutil.which("lm_eval") or str(Path(sys.executable).with_name("lm_eval"))
    return [
        lm_eval, "--model", "retrieval-head-hf", "--model_args", "pretrained=smollm2-135m",
        "--tasks", "niah_retrieval_heads_en", "--include_path", str(REPO / "tasks"),
        "--metadata", '{"context_lengths":[300],"depths":[50]}', "--output_path", output,
    ]  # fmt: skip


def timed_run(env: dict[str, str]) -> tuple[float, float]:
    """(seconds to the first request, seconds in all) of one run; the first is inf if the line never came."""
    with tempfile.TemporaryDirectory() as output:
        start = time.perf_counter()
        process = subprocess.Popen(
            lm_eval_command(output), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        first = float("inf")
        assert process.stderr is not None
        for line in process.stderr:
            if first == float("inf") and FIRST_REQUEST in line:
                first = time.perf_counter() - start
        if process.wait() != 0:
            raise SystemExit(f"lm_eval failed (exit {process.returncode})")
        return first, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="warm runs of each kind (the best is reported)")
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="lmr-startup-cache-")
    env = {**os.environ, "LMR_CACHE": cache, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    rows = [("cold", *timed_run(env))]
    warm = [timed_run(env) for _ in range(args.runs)]
    rows.append(("warm", *min(warm)))
    uncached = [timed_run({**env, "LMR_TASK_INDEX_CACHE": "0"}) for _ in range(args.runs)]
    rows.append(("no index cache", *min(uncached)))
    shutil.rmtree(cache, ignore_errors=True)
    print("| run | to first document (s) | total (s) |")
    print("|---|---:|---:|")
    for name, first, total in rows:
        print(f"| {name} | {first:.1f} | {total:.1f} |")
    print(f"\nwarm / no index cache, to first document: {rows[1][1] / rows[2][1]:.2f}x")


if __name__ == "__main__":
    main()
