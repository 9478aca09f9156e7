"""The real entry points, as a user types them: `lm_eval ...` and `lm-eval-retrieval ...` in subprocesses."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lm_eval_retrieval.cli import tasks_dir

BIN = Path(sys.executable).parent
GRID = '{"context_lengths":[300,600],"depths":[0,100]}'


def _run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    environment.update(env or {})
    return subprocess.run(list(args), capture_output=True, text=True, env=environment, cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def detection_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    result = _run(
        str(BIN / "lm_eval"), "--model", "retrieval-head-hf", "--model_args", "pretrained=smollm2-135m",
        "--tasks", "niah_retrieval_heads_en", "--include_path", tasks_dir(),
        "--metadata", GRID, "--output_path", str(out), "--log_samples",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_lm_eval_writes_a_head_score_file_the_seed_snippet_reads(detection_run: Path) -> None:
    path = detection_run / "head_score" / "smollm2-135m.json"
    with open(path) as file:
        head_list = json.loads(file.readline())  # the seed README's own way of reading it
    assert len(head_list) == 30 * 9
    assert set(head_list) == {f"{layer}-{head}" for layer in range(30) for head in range(9)}
    values = np.array([v for scores in head_list.values() for v in scores])
    assert len(values) == 30 * 9 * 4, "every one of the 4 documents is answered right at these lengths"
    assert values.min() >= 0.0 and values.max() <= 1.0
    assert max(np.mean(scores) for scores in head_list.values()) > 0


def test_results_json_and_log_samples(detection_run: Path) -> None:
    results = json.loads(Path(glob.glob(str(detection_run / "*" / "results_*.json"))[0]).read_text())
    info = results["config"]["retrieval_heads"]
    assert info["documents_run"] == 4 and info["documents_counted"] == 4
    assert len(info["top_heads"]) == 20 and info["top_heads"][0]["score"] > 0
    assert results["results"]["niah_retrieval_heads_en"]["needle_found,none"] == 1.0
    samples = [json.loads(line) for line in open(glob.glob(str(detection_run / "*" / "samples_*.jsonl"))[0])]
    assert len(samples) == 4
    assert sorted((s["doc"]["context_length"], s["doc"]["depth"]) for s in samples) == [
        (300, 0.0), (300, 100.0), (600, 0.0), (600, 100.0)
    ]
    for sample in samples:
        assert sample["doc"]["length"] <= sample["doc"]["context_length"]
        assert sample["doc"]["answer"] in sample["resps"][0][0]


def test_heads_command_ranks_the_file(detection_run: Path) -> None:
    path = str(detection_run / "head_score" / "smollm2-135m.json")
    result = _run(str(BIN / "lm-eval-retrieval"), "heads", path, "--top", "3")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 1 ") or line.startswith("| 3 ")]
    assert len(rows) == 2
    compared = _run(str(BIN / "lm-eval-retrieval"), "heads", path, "--compare", path)
    assert compared.returncode == 0 and "10/10" in compared.stdout.replace(" ", "")


def test_tasks_dir_holds_the_task() -> None:
    result = _run(str(BIN / "lm-eval-retrieval"), "tasks-dir")
    assert (Path(result.stdout.strip()) / "niah_retrieval_heads_en.yaml").is_file()


def test_import_does_not_import_torch() -> None:
    code = "import sys, lm_eval_retrieval; import lm_eval.api.registry as r; print('torch' in sys.modules, 'retrieval-head-hf' in r.model_registry, 'hf' in r.model_registry)"
    result = _run(sys.executable, "-c", code)
    assert result.stdout.split() == ["False", "True", "True"], result.stderr


def test_run_finds_the_bundled_task_and_rejects_a_metadata_typo(tmp_path: Path) -> None:
    # No --include_path and no --model: `run` adds both. The typo is caught inside the task's own dataset code,
    # so reaching that message proves lm-eval found the bundled task.
    result = _run(
        str(BIN / "lm-eval-retrieval"), "run", "--model_args", "pretrained=smollm2-135m",
        "--tasks", "niah_retrieval_heads_en", "--metadata", '{"depth":[50]}', "--output_path", str(tmp_path),
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "unknown --metadata key(s) 'depth'" in errors[0] and "depths" in errors[0]
    assert not (tmp_path / "head_score").exists()


@pytest.fixture(scope="module")
def approx_runs(tmp_path_factory) -> dict[str, Path]:
    """The seed's flags through `lm-eval-retrieval approx`, once exact and once with the LSH retriever."""
    runs = {}
    for approx in ("exact_topk", "simhash"):
        out = tmp_path_factory.mktemp(approx)
        result = _run(
            str(BIN / "lm-eval-retrieval"), "approx", "--pretrained", "smollm2-135m", "--tasks", "retrieval_ppl_en",
            "--batch", "2", "--limit", "2", "--topk", "10", "--layerwise_topk_analysis", "--approx", approx,
            "--output_path", str(out), "--metadata", '{"doc_sentences":12}',
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "| model.layers.29.self_attn" in result.stdout
        runs[approx] = out / "smollm2-135m"
    return runs


def test_approx_run_writes_table_stats_and_plots(approx_runs: dict[str, Path]) -> None:
    folder = approx_runs["exact_topk"]
    rows = [line for line in (folder / "recall_table.md").read_text().splitlines() if line.startswith("| model.")]
    assert [row.split("|")[1].strip() for row in rows] == [f"model.layers.{i}.self_attn" for i in range(30)]
    stats = json.loads((folder / "recall_stats.json").read_text())
    assert stats["topk"] == 10 and stats["layerwise_topk_analysis"] is True
    assert all(r == 1.0 for layer in stats["layers"] for r in layer["recall"])
    assert all(q > 0 for layer in stats["layers"] for q in layer["queries"])
    assert len(stats["mass_curve"]["mass"]) == 30 and stats["mass_curve"]["k"][-1] == 1024
    for png in ("exact_topk_attn_ratio.png", "approx_topk_attn_ratio.png", "recall_heatmap.png", "topk_mass_curve.png"):
        assert (folder / png).stat().st_size > 5000
    results = json.loads(Path(glob.glob(str(folder / "results_*.json"))[0]).read_text())
    assert results["config"]["retrieval_approx"]["layers"][0]["queries"] == stats["layers"][0]["queries"]
    simhash = json.loads((approx_runs["simhash"] / "recall_stats.json").read_text())
    assert np.nanmean([r for layer in simhash["layers"] for r in layer["recall"]]) < 0.9


def test_compare_two_runs(approx_runs: dict[str, Path], tmp_path: Path) -> None:
    result = _run(
        str(BIN / "lm-eval-retrieval"), "compare", str(approx_runs["exact_topk"]), str(approx_runs["simhash"]),
        "--output_dir", str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "model.layers.0.self_attn" in result.stdout
    assert (tmp_path / "comparison.md").is_file() and (tmp_path / "recall_delta_heatmap.png").stat().st_size > 5000


def test_readme_subclass_example_through_run_import(tiny_model_dir: str, tmp_path: Path) -> None:
    from test_ret_approx import readme_example

    (tmp_path / "my_approx.py").write_text(readme_example())
    result = _run(
        str(BIN / "lm-eval-retrieval"), "run", "--import", "my_approx", "--model", "recent-approx-hf",
        "--model_args", f"pretrained={tiny_model_dir},topk=2,min_visible_keys=20", "--tasks", "retrieval_ppl_en",
        "--limit", "1", "--output_path", "out", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads(next((tmp_path / "out").glob("*/recall_stats.json")).read_text())
    assert stats["approx"] == "most_recent_keys"
    assert 0 < np.nanmean([r for layer in stats["layers"] for r in layer["recall"]]) < 1


def test_mask_sweep_runs_top_and_random_k(detection_run: Path, tmp_path: Path) -> None:
    scores = detection_run / "head_score" / "smollm2-135m.json"
    result = _run(
        str(BIN / "lm-eval-retrieval"), "mask-sweep", "--model_args", "pretrained=smollm2-135m",
        "--head_scores", str(scores), "--ks", "0,5", "--metadata", '{"context_lengths":[300],"depths":[0,100]}',
        "--output_path", str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import pandas as pd

    table = pd.read_csv(tmp_path / "mask_sweep.csv")
    assert list(zip(table["kind"], table["k"])) == [("none", 0), ("top", 5), ("random", 5)]
    from lm_eval_retrieval.report.heads import load_head_scores, rank_heads

    top5 = set(table.loc[table["kind"] == "top", "heads"].iloc[0].split(";"))
    assert top5 == {f"{layer}-{head}" for layer, head, _ in rank_heads(load_head_scores(scores))[:5]}
    random5 = set(table.loc[table["kind"] == "random", "heads"].iloc[0].split(";"))
    assert len(random5) == 5 and not random5 & top5
    for kind, k in (("none", 0), ("top", 5), ("random", 5)):
        assert (tmp_path / f"niah_niah_retrieval_heads_en_{kind}_{k}.png").stat().st_size > 5000
    assert (tmp_path / "mask_sweep.png").stat().st_size > 5000


def test_plot_command_draws_niah_and_head_heatmaps(detection_run: Path, tmp_path: Path) -> None:
    result = _run(str(BIN / "lm-eval-retrieval"), "plot", str(detection_run), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert any(name.startswith("niah_heatmap") for name in pngs) and any(name.startswith("head_scores") for name in pngs)


# ------------------------------------------------------------------------------------------------------------------
# Many processes, resume, determinism


def _free_port() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _launch_two(*lm_eval_args: str) -> subprocess.CompletedProcess:
    """`accelerate launch --num_processes 2 -m lm_eval ...` on this CPU-only machine (gloo)."""
    return _run(
        str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", _free_port(),
        "-m", "lm_eval", *lm_eval_args,
    )


def test_two_processes_write_the_single_process_head_score_file(detection_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "two"
    result = _launch_two(
        "--model", "retrieval-head-hf", "--model_args", "pretrained=smollm2-135m", "--tasks", "niah_retrieval_heads_en",
        "--include_path", tasks_dir(), "--metadata", GRID, "--output_path", str(out), "--log_samples",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on rank 1" in result.stderr, "the second process must get its share of the documents"
    single = (detection_run / "head_score" / "smollm2-135m.json").read_bytes()
    assert (out / "head_score" / "smollm2-135m.json").read_bytes() == single
    info = json.loads(next(out.glob("*/results_*.json")).read_text())["config"]["retrieval_heads"]
    assert info["documents_run"] == 4 and info["documents_counted"] == 4


APPROX_ARGS = (
    "--model", "ret-approx-hf", "--model_args", "pretrained=smollm2-135m,topk=10,approx=simhash",
    "--tasks", "retrieval_ppl_en", "--include_path", tasks_dir(), "--limit", "3", "--batch_size", "1",
    "--metadata", '{"doc_sentences":12}',
)


def test_two_processes_add_up_to_the_single_process_recall_table(tmp_path: Path) -> None:
    """3 documents over 2 ranks: lm-eval pads rank 1 with a copy of its request, which must not be counted twice.
    Also: the same command twice gives byte-identical tables (simhash's hyperplanes are seeded)."""
    runs = {}
    for name in ("one", "again"):
        result = _run(str(BIN / "lm_eval"), *APPROX_ARGS, "--output_path", str(tmp_path / name))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = tmp_path / name / "smollm2-135m"
    result = _launch_two(*APPROX_ARGS, "--output_path", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-3000:]
    runs["two"] = tmp_path / "two" / "smollm2-135m"

    table = (runs["one"] / "recall_table.md").read_bytes()
    assert (runs["again"] / "recall_table.md").read_bytes() == table
    assert (runs["two"] / "recall_table.md").read_bytes() == table
    one, two = (json.loads((runs[n] / "recall_stats.json").read_text()) for n in ("one", "two"))
    for layer_one, layer_two in zip(one["layers"], two["layers"], strict=True):
        assert layer_one["queries"] == layer_two["queries"], "every query counted exactly once"
        np.testing.assert_allclose(layer_two["recall"], layer_one["recall"], rtol=1e-9)
        np.testing.assert_allclose(layer_two["error_norm"], layer_one["error_norm"], rtol=1e-6)


def test_killed_run_resumes_from_use_cache_and_ends_with_the_same_file(detection_run: Path, tmp_path: Path) -> None:
    import signal
    import sqlite3
    import time

    cache = tmp_path / "cache" / "niah"
    args = [
        str(BIN / "lm_eval"), "--model", "retrieval-head-hf", "--model_args", "pretrained=smollm2-135m",
        "--tasks", "niah_retrieval_heads_en", "--include_path", tasks_dir(), "--metadata", GRID,
        "--output_path", str(tmp_path / "out"), "--use_cache", str(cache),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    database = Path(f"{cache}_rank0.db")

    def finished_documents() -> int:
        try:
            with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1) as connection:
                return connection.execute('SELECT COUNT(*) FROM "lmr_retrieval_heads"').fetchone()[0]
        except sqlite3.Error:
            return 0

    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while finished_documents() < 2 and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = finished_documents()
    assert 2 <= done < 4, f"the run was to be killed half-way, after {done} of 4 documents"
    assert not (tmp_path / "out" / "head_score").exists(), "a killed run writes no head-score file"

    result = _run(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed {done} of 4 documents" in result.stderr
    assert finished_documents() == 4
    resumed = (tmp_path / "out" / "head_score" / "smollm2-135m.json").read_bytes()
    assert resumed == (detection_run / "head_score" / "smollm2-135m.json").read_bytes()
