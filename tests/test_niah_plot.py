"""Tests for lm_eval_retrieval.report.niah_plot: NIAH heatmaps from lm-eval --log_samples files, head-score maps."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from matplotlib.image import AxesImage

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.report.heads import load_head_scores, write_head_scores
from lm_eval_retrieval.report.niah_plot import (
    add_plot_arguments,
    find_samples,
    head_score_heatmap,
    load_niah_samples,
    niah_heatmap,
    niah_table,
    plot_results,
    plot_side_by_side,
    run_plot,
    side_by_side,
)

# (context_length, depth, rouge1_recall, needle_found): 2 lengths x 3 depths, two samples in some cells.
SAMPLES = [
    (1000, 50.0, 100.0, 1),
    (1000, 0.0, 80.0, 1),
    (1000, 0.0, 40.0, 0),
    (1000, 100.0, 0.0, 0),
    (2000, 0.0, 60.0, 1),
    (2000, 50.0, 20.0, 0),
    (2000, 50.0, 30.0, 1),
    (2000, 100.0, 90.0, 1),
]
# Hand-computed cell means, depth rows ascending (0, 50, 100) x lengths (1000, 2000).
ROUGE = [[60.0, 60.0], [100.0, 25.0], [0.0, 90.0]]
FOUND = [[50.0, 100.0], [100.0, 50.0], [0.0, 100.0]]
STAMP = "2025-01-02T03-04-05.678901"


def write_samples(path: Path, rows=SAMPLES, scale: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (length, depth, rouge, found) in enumerate(rows):
        record = {
            "doc_id": i,
            "doc": {"context_length": length, "length": length - 3, "depth": depth, "answer": "x", "language": "en"},
            "target": "x",
            "resps": [["x"]],
            "filtered_resps": ["x"],
            "filter": "none",
            "rouge1_recall": rouge * scale,
            "needle_found": found,
        }
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def image_axes(fig):
    return [ax for ax in fig.axes if any(isinstance(a, AxesImage) for a in ax.get_images())]


def assert_one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


@pytest.fixture
def results(tmp_path: Path) -> Path:
    write_samples(tmp_path / "res" / "my__model" / f"samples_niah_retrieval_heads_en_{STAMP}.jsonl")
    return tmp_path / "res"


def test_load_and_table_values(results: Path):
    files = find_samples(results)
    assert [f.name for f in files] == [f"samples_niah_retrieval_heads_en_{STAMP}.jsonl"]
    df = load_niah_samples(files)
    assert list(df.columns) == ["context_length", "length", "depth", "rouge1_recall", "needle_found", "task"]
    assert len(df) == len(SAMPLES)
    assert set(df["task"]) == {"niah_retrieval_heads_en"}
    assert df["length"].tolist() == [s[0] - 3 for s in SAMPLES]

    table = niah_table(df)
    assert table.index.tolist() == [0.0, 50.0, 100.0]
    assert table.columns.tolist() == [1000, 2000]
    np.testing.assert_allclose(table.to_numpy(), ROUGE)
    np.testing.assert_allclose(niah_table(df, "needle_found").to_numpy(), FOUND)
    with pytest.raises(UserInputError):
        niah_table(df, "accuracy")


def test_heatmap_matches_table(results: Path):
    df = load_niah_samples(find_samples(results))
    for metric, expected in (("rouge1_recall", ROUGE), ("needle_found", FOUND)):
        fig = niah_heatmap(df, metric=metric, title="run")
        axes = image_axes(fig)
        assert len(axes) == 1
        image = axes[0].get_images()[0]
        assert image.get_clim() == (0.0, 100.0)
        np.testing.assert_allclose(np.asarray(image.get_array()), expected)
        assert f"average {np.mean(expected):.1f}" in axes[0].get_title()
        assert axes[0].get_xlabel().lower().startswith("context length")
        assert [t.get_text() for t in axes[0].get_xticklabels()] == ["1000", "2000"]
        assert [t.get_text() for t in axes[0].get_yticklabels()] == ["0", "50", "100"]
        # red at 0, green at 100, as the original notebook
        cmap = image.get_cmap()
        assert cmap(0.0)[:3] == pytest.approx((0xF0 / 255, 0x49 / 255, 0x6E / 255), abs=0.01)
        assert cmap(1.0)[:3] == pytest.approx((0x0C / 255, 0xD7 / 255, 0x9F / 255), abs=0.01)
        assert len(fig.axes) == 2  # the heatmap and its colorbar


def test_side_by_side_shares_one_scale(tmp_path: Path, results: Path):
    df_a = load_niah_samples(find_samples(results))
    df_b = load_niah_samples(write_samples(tmp_path / f"samples_niah_b_{STAMP}.jsonl", scale=0.5))
    fig = side_by_side(df_a, df_b, "exact", "approx")
    axes = image_axes(fig)
    assert len(axes) == 2
    images = [ax.get_images()[0] for ax in axes]
    assert images[0].get_clim() == images[1].get_clim() == (0.0, 100.0)
    assert images[0].norm is images[1].norm
    np.testing.assert_allclose(np.asarray(images[1].get_array()), np.asarray(ROUGE) * 0.5)
    others = [ax for ax in fig.axes if ax not in axes]
    assert len(others) == 1  # exactly one colorbar
    assert "exact" in axes[0].get_title() and "approx" in axes[1].get_title()


def test_head_score_heatmap(tmp_path: Path):
    path = tmp_path / "head_score" / "m.json"
    scores = {(layer, head): [layer / 3, head / 4] for layer in range(3) for head in range(4)}
    write_head_scores(path, scores)
    fig = head_score_heatmap(load_head_scores(path))
    axes = image_axes(fig)
    assert len(axes) == 1
    image = axes[0].get_images()[0]
    assert image.get_clim() == (0.0, 1.0)
    grid = np.asarray(image.get_array())
    assert grid.shape == (3, 4)
    assert grid[2, 3] == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert grid[0, 0] == 0.0


def test_plot_results_writes_pngs(tmp_path: Path, results: Path):
    write_head_scores(results / "head_score" / "my__model.json", {"0-0": [1.0], "1-1": [0.5, 0.0]})
    written = plot_results(results)
    names = sorted(p.name for p in written)
    assert names == ["head_scores_my__model.png", "niah_heatmap.png"]
    for path in written:
        assert path.parent == results
        image = mpimg.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100

    # two tasks: one file per task; out_dir honoured
    write_samples(results / "my__model" / f"samples_niah_other_{STAMP}.jsonl")
    out = tmp_path / "plots"
    written = plot_results(results, out_dir=out, metric="needle_found")
    assert sorted(p.name for p in written) == [
        "head_scores_my__model.png",
        "niah_heatmap_niah_other.png",
        "niah_heatmap_niah_retrieval_heads_en.png",
    ]
    assert all(p.parent == out and mpimg.imread(p).size > 0 for p in written)


def test_plot_results_uses_newest_rerun(tmp_path: Path):
    folder = tmp_path / "res" / "m"
    write_samples(folder / "samples_niah_x_2025-01-01T00-00-00.000001.jsonl", scale=0.0)
    write_samples(folder / "samples_niah_x_2025-06-01T00-00-00.000001.jsonl")
    written = plot_results(tmp_path / "res", out_dir=tmp_path / "out")
    assert [p.name for p in written] == ["niah_heatmap.png"]
    written = plot_side_by_side(folder, folder / "samples_niah_x_2025-06-01T00-00-00.000001.jsonl",
                                tmp_path / "sbs.png")
    assert mpimg.imread(written).ndim == 3


def test_errors_are_one_line(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserInputError) as error:
        find_samples(empty)
    message = assert_one_line(error)
    assert str(empty) in message and "--log_samples" in message
    with pytest.raises(UserInputError) as error:
        plot_results(empty)
    assert_one_line(error)

    bad = write_samples(tmp_path / f"samples_niah_bad_{STAMP}.jsonl")
    bad.write_text(bad.read_text().replace("\n", "\n{not json\n", 1), encoding="utf-8")
    with pytest.raises(UserInputError) as error:
        load_niah_samples([bad])
    message = assert_one_line(error)
    assert str(bad) in message and "line 2" in message

    lines = write_samples(tmp_path / f"samples_niah_miss_{STAMP}.jsonl").read_text().splitlines()
    record = json.loads(lines[2])
    del record["doc"]["depth"]
    lines[2] = json.dumps(record)
    missing = tmp_path / f"samples_niah_miss_{STAMP}.jsonl"
    missing.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(UserInputError) as error:
        load_niah_samples([missing])
    message = assert_one_line(error)
    assert "line 3" in message and "depth" in message

    record = json.loads(lines[0])
    record["rouge1_recall"] = "high"
    odd = tmp_path / f"samples_niah_odd_{STAMP}.jsonl"
    odd.write_text(json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(UserInputError) as error:
        load_niah_samples([odd])
    assert "rouge1_recall" in assert_one_line(error)

    with pytest.raises(UserInputError) as error:
        find_samples(tmp_path / "nope")
    assert_one_line(error)


def parse(argv: list[str]) -> argparse.Namespace:
    return add_plot_arguments(argparse.ArgumentParser(prog="plot")).parse_args(argv)


def test_run_plot_cli(tmp_path: Path, results: Path, monkeypatch):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_plot(parse([str(results), "--metric", "needle_found"])) == 0
    printed = out.getvalue().split()
    assert printed == [str(results / "niah_heatmap.png")]
    assert mpimg.imread(printed[0]).ndim == 3

    other = write_samples(tmp_path / "b" / "m" / f"samples_niah_retrieval_heads_en_{STAMP}.jsonl", scale=0.5)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_plot(parse(["--side-by-side", str(results), str(other)])) == 0
    assert out.getvalue().split() == ["niah_side_by_side.png"]
    assert mpimg.imread(tmp_path / "niah_side_by_side.png").ndim == 3

    target = tmp_path / "cmp" / "x.png"
    with contextlib.redirect_stdout(io.StringIO()):
        run_plot(parse(["--side-by-side", str(results), str(other), "--out", str(target), "--names", "A", "B"]))
    assert mpimg.imread(target).ndim == 3

    with pytest.raises(UserInputError):
        run_plot(parse([]))
    with pytest.raises(SystemExit):
        parse([str(results), "--metric", "accuracy"])
