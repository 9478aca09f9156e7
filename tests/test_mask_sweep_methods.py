"""`mask-sweep --head_scores A B C --seeds 0,1,2`: each scoring method's top K against K random heads per seed, the
model loaded once. The plan is checked by itself; the sweep runs on a fake model and evaluator (seconds), and once on a
tiny real model through lm-eval with `--use_cache` resumed."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.mask_sweep import (
    default_output_dir,
    parse_seeds,
    plan_sweep,
    run_mask_sweep,
    sweep_curves,
)
from lm_eval_retrieval.models.masking import select_heads

SHAPE = (4, 5)  # 20 heads
TASK = "niah_retrieval_heads_en"


def write_scores(path: Path, order: list[int]) -> str:
    """A head-score file whose ranking is `order` (head i is (i // 5, i % 5)), best first."""
    scores = {f"{i // 5}-{i % 5}": [float(len(order) - rank)] for rank, i in enumerate(order)}
    path.write_text(json.dumps(scores) + "\n")
    return str(path)


@pytest.fixture()
def files(tmp_path: Path) -> list[str]:
    heads = list(range(20))
    return [
        write_scores(tmp_path / "model.json", heads),
        write_scores(tmp_path / "model.mass.json", heads[:2] + heads[2:][::-1]),  # the same top 2 as copy, then not
        write_scores(tmp_path / "model.qr.json", heads[::-1]),
    ]


# --------------------------------------------------------------------------------------------------------------------
# the plan


def test_plan_has_one_run_per_file_or_seed_and_k(files: list[str]) -> None:
    runs = plan_sweep(SHAPE, files, [0, 2, 4], [0, 1, 2])
    assert [(r.kind, r.method, r.k, r.seed) for r in runs] == [("none", "none", 0, None)] + [
        (kind, method, k, seed)
        for k in (2, 4)
        for kind, method, seed in [("top", "copy", None), ("top", "mass", None), ("top", "qr", None),
                                   ("random", "random", 0), ("random", "random", 1), ("random", "random", 2)]
    ]
    top = {(r.method, r.k): r.heads for r in runs if r.kind == "top"}
    assert top[("copy", 4)] == ((0, 0), (0, 1), (0, 2), (0, 3))
    assert top[("mass", 4)] == ((0, 0), (0, 1), (3, 4), (3, 3))
    assert top[("qr", 2)] == ((3, 4), (3, 3))
    for k in (2, 4):
        draws = [r.heads for r in runs if r.kind == "random" and r.k == k]
        assert len(set(draws)) == 3, "each seed draws other heads"
        excluded = {h for (method, kk), heads in top.items() if kk == k for h in heads}
        assert all(len(d) == k and not set(d) & excluded for d in draws), "never a head of any file's top K"
    again = plan_sweep(SHAPE, files, [0, 2, 4], [0, 1, 2])
    assert again == runs, "the same files and seeds draw the same heads"


def test_one_file_draws_exactly_what_mask_random_draws(files: list[str]) -> None:
    runs = plan_sweep(SHAPE, files[:1], [3, 5], [0, 7])
    for run in runs:
        if run.kind == "random":
            assert list(run.heads) == select_heads(SHAPE, mask_random=run.k, head_scores=files[0], seed=run.seed)
        if run.kind == "top":
            assert list(run.heads) == select_heads(SHAPE, mask_topk=run.k, head_scores=files[0])
    assert [r.name for r in runs] == ["none_0", "top_3", "random-seed0_3", "random-seed7_3", "top_5",
                                      "random-seed0_5", "random-seed7_5"]
    assert [r.name for r in plan_sweep(SHAPE, files[:1], [3], [0])] == ["none_0", "top_3", "random_3"]


def test_plan_refuses_what_cannot_run(files: list[str]) -> None:
    with pytest.raises(UserInputError, match="only 4 heads lie outside the top 8 of every file"):
        plan_sweep(SHAPE, files, [8], [0])  # copy's 0-7, mass's 0, 1, 14-19 and qr's 12-19 leave 8-11
    with pytest.raises(UserInputError, match="is for a model of 4 layers x 5 heads, this model has 30 x 9"):
        plan_sweep((30, 9), files, [2], [0])
    with pytest.raises(UserInputError, match="repeats a seed"):
        parse_seeds("0,1,0")
    with pytest.raises(UserInputError, match="comma-separated integers"):
        parse_seeds("0,one")


def test_default_output_dir_names_the_model() -> None:
    assert default_output_dir("head_score/smollm2-135m.json") == "results/mask-sweep-smollm2-135m"
    assert default_output_dir(["head_score/m.mass.json", "head_score/m.json"]) == "results/mask-sweep-m"
    assert default_output_dir(["h/Qwen2.5-3B.json", "h/Qwen2.5-3B.qr.json"]) == "results/mask-sweep-Qwen2.5-3B"


# --------------------------------------------------------------------------------------------------------------------
# the sweep on a fake model and evaluator


class FakeLM:
    """What the sweep uses of RetrievalHeadLM; counts how often it is built."""

    built = 0

    def __init__(self, **kwargs) -> None:
        FakeLM.built += 1
        self.kwargs = kwargs
        self.hook_state = SimpleNamespace(num_layers=SHAPE[0], num_heads=SHAPE[1])
        self.masked_heads: list = []
        self.output_dir = kwargs.get("output_path")

    def set_head_mask(self, heads, mode="uniform") -> None:
        self.masked_heads = sorted(heads)
        self.mode = mode

    def reset_scores(self) -> None:
        pass


def fake_rouge(heads) -> float:
    """Masking head (0, 0) or (0, 1) breaks retrieval, every other head costs a little."""
    return 0.0 if {(0, 0), (0, 1)} & set(heads) else 100.0 - 2 * len(heads)


@pytest.fixture()
def fake_sweep(monkeypatch):
    import lm_eval
    import lm_eval.tasks

    import lm_eval_retrieval.models.head_trace as head_trace

    calls = []

    def simple_evaluate(model, tasks, task_manager, limit, log_samples, use_cache):
        calls.append({"heads": list(model.masked_heads), "use_cache": use_cache, "output_dir": model.output_dir})
        rouge = fake_rouge(model.masked_heads)
        samples = [{"doc": {"context_length": 300, "length": 298, "depth": depth}, "rouge1_recall": rouge,
                    "needle_found": float(rouge > 50)} for depth in (0.0, 100.0)]
        return {"results": {t: {"rouge1_recall,none": rouge, "needle_found,none": float(rouge > 50)} for t in tasks},
                "samples": {t: samples for t in tasks}}

    FakeLM.built = 0
    monkeypatch.setattr(head_trace, "RetrievalHeadLM", FakeLM)
    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kwargs: SimpleNamespace(**kwargs))
    return calls


def test_sweep_loads_once_and_writes_one_row_per_file_or_seed_and_k(files, fake_sweep, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    table = run_mask_sweep({"pretrained": "fake"}, files, [0, 2, 4], [TASK], str(out), seeds=[0, 1, 2],
                           use_cache=str(tmp_path / "cache"))
    assert FakeLM.built == 1, "the model is loaded once"
    assert len(table) == 1 + 2 * (3 + 3)
    csv = pd.read_csv(out / "mask_sweep.csv")
    assert list(csv.columns) == ["kind", "method", "k", "seed", "task", "needle_found", "rouge1_recall", "file", "heads"]
    keys = [(kind, method, k, None if pd.isna(seed) else int(seed)) for kind, method, k, seed
            in zip(csv["kind"], csv["method"], csv["k"], csv["seed"])]
    assert keys == [("none", "none", 0, None)] + [
        (kind, method, k, seed) for k in (2, 4) for kind, method, seed in
        [("top", "copy", None), ("top", "mass", None), ("top", "qr", None),
         ("random", "random", 0), ("random", "random", 1), ("random", "random", 2)]
    ]
    assert csv.loc[csv["method"] == "mass", "file"].tolist() == [files[1]] * 2
    by_key = {(m, k, None if pd.isna(s) else int(s)): r
              for m, k, s, r in zip(csv["method"], csv["k"], csv["seed"], csv["rouge1_recall"])}
    assert by_key[("copy", 2, None)] == 0.0 and by_key[("qr", 2, None)] == 96.0
    # the top 2 of copy and mass are the same heads: evaluated once; every other run once
    assert len(fake_sweep) == len(table) - 1
    assert len({tuple(map(tuple, c["heads"])) for c in fake_sweep}) == len(fake_sweep)
    assert {c["use_cache"] for c in fake_sweep} == {str(tmp_path / "cache")}, "--use_cache reaches every run"
    random_draws = {tuple(h.split(";")) for h in csv.loc[(csv["kind"] == "random") & (csv["k"] == 4), "heads"]}
    assert len(random_draws) == 3
    assert (out / "mask_sweep.png").stat().st_size > 5000
    assert json.loads((out / "mask_sweep.json").read_text())[0]["kind"] == "none"
    for name in ("none_0", "top-copy_2", "top-mass_2", "top-qr_4", "random-seed0_2", "random-seed2_4"):
        assert (out / f"niah_{TASK}_{name}.png").stat().st_size > 5000, name


def test_cli_several_files_and_seeds(files, fake_sweep, tmp_path: Path, capsys) -> None:
    from lm_eval_retrieval.cli import main

    out = tmp_path / "cli"
    argv = ["mask-sweep", "--model_args", "pretrained=fake", "--head_scores", *files, "--ks", "0,2", "--seeds", "0,1",
            "--output_path", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"\|\s*random\s*\|\s*random\s*\|\s*2\s*\|\s*1\s*\|", printed), printed
    assert re.search(r"\|\s*none\s*\|\s*none\s*\|\s*0\s*\|\s*\|", printed), "no seed printed as empty"
    assert len(pd.read_csv(out / "mask_sweep.csv")) == 1 + 3 + 2
    assert main([*argv, "--seed", "3"]) == 2
    assert "not both" in capsys.readouterr().err
    # one file, one seed: the single-file sweep as before
    assert main(["mask-sweep", "--model_args", "pretrained=fake", "--head_scores", files[0], "--ks", "0,2",
                 "--seed", "4", "--output_path", str(tmp_path / "one")]) == 0
    one = pd.read_csv(tmp_path / "one" / "mask_sweep.csv")
    assert list(zip(one["kind"], one["k"])) == [("none", 0), ("top", 2), ("random", 2)]
    assert one.loc[2, "heads"] == ";".join(f"{l}-{h}" for l, h in select_heads(SHAPE, mask_random=2,
                                                                                    head_scores=files[0], seed=4))
    assert (tmp_path / "one" / f"niah_{TASK}_random_2.png").is_file()


def test_bad_files_fail_before_the_model_loads(files, fake_sweep, tmp_path: Path, capsys) -> None:
    from lm_eval_retrieval.cli import main

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"0-0": [1.0], "1-1": [0.5]}))
    for extra, message in (([str(tmp_path / "missing.json")], "does not exist"),
                           ([str(other)], "give files of one model"), ([files[0]], "twice")):
        assert main(["mask-sweep", "--head_scores", *files, *extra, "--output_path", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert FakeLM.built == 0


def test_random_curve_is_the_mean_with_a_min_max_band() -> None:
    rows = [("none", "none", 0, None, 90.0), ("top", "copy", 5, None, 10.0), ("top", "mass", 5, None, 50.0),
            ("random", "random", 5, 0, 40.0), ("random", "random", 5, 1, 70.0), ("random", "random", 5, 2, 85.0)]
    table = pd.DataFrame(rows, columns=["kind", "method", "k", "seed", "rouge1_recall"])
    table["seed"] = table["seed"].astype("Int64")
    curves = sweep_curves(table, "rouge1_recall")
    assert list(curves) == ["copy", "mass", "random"]
    assert curves["copy"]["mean"].tolist() == [90.0, 10.0]
    assert curves["random"].loc[5].tolist() == [65.0, 40.0, 85.0]
    assert curves["random"].loc[0].tolist() == [90.0, 90.0, 90.0]


# --------------------------------------------------------------------------------------------------------------------
# a real run: a tiny model through lm-eval, resumed from --use_cache


def test_tiny_model_sweep_resumes_from_use_cache(tiny_model_dir: str, tmp_path: Path) -> None:
    shape = (2, 4)
    order = list(range(8))
    paths = []
    for name, ranking in (("tiny.json", order), ("tiny.mass.json", order[::-1])):
        scores = {f"{i // 4}-{i % 4}": [float(8 - rank)] for rank, i in enumerate(ranking)}
        (tmp_path / name).write_text(json.dumps(scores) + "\n")
        paths.append(str(tmp_path / name))
    grid = {"context_lengths": [200], "depths": [50]}
    cache = tmp_path / "cache" / "sweep"
    args = ({"pretrained": tiny_model_dir, "max_new_tokens": 4}, paths, [0, 1], [TASK])
    first = run_mask_sweep(*args, str(tmp_path / "a"), metadata=grid, seeds=[0, 1], use_cache=str(cache))
    assert len(first) == 1 + 2 + 2
    with sqlite3.connect(f"{cache}_rank0.db") as connection:
        stored = connection.execute('SELECT COUNT(*) FROM "lmr_retrieval_heads"').fetchone()[0]
    assert stored == len(first), "one finished document per run in the cache"
    again = run_mask_sweep(*args, str(tmp_path / "b"), metadata=grid, seeds=[0, 1], use_cache=str(cache))
    with sqlite3.connect(f"{cache}_rank0.db") as connection:
        assert connection.execute('SELECT COUNT(*) FROM "lmr_retrieval_heads"').fetchone()[0] == stored
    pd.testing.assert_frame_equal(first, again)
    assert select_heads(shape, mask_topk=1, head_scores=paths[1]) == [(1, 3)]
    assert first.loc[first["method"] == "mass", "heads"].tolist() == ["1-3"]
    assert (tmp_path / "b" / "mask_sweep.png").stat().st_size > 5000
