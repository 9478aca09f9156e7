"""Reports of ret-approx-hf statistics: per-layer table, files, plots and run comparison (no model, no torch)."""

from __future__ import annotations

import copy
import json
import math

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.report.compare_runs import (
    COMPARISON_COLUMNS,
    compare_runs,
    delta_heatmap,
    format_comparison,
    write_comparison,
)
from lm_eval_retrieval.report.plots import mass_curve, recall_heatmap, save_png, topk_mass_heatmap
from lm_eval_retrieval.report.recall import (
    TABLE_COLUMNS,
    format_recall_table,
    layer_table,
    load_recall_stats,
    write_recall_reports,
)

KS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def make_stats(**changes):
    """2 layers x 3 heads. Layer 0: all heads counted. Layer 1: head 2 counted no query (values None)."""
    stats = {
        "model": "smollm2-135m",
        "approx": "exact_topk",
        "topk": 10,
        "layerwise_topk_analysis": True,
        "min_visible_keys": 100,
        "layers": [
            {
                "layer": 0,
                "module": "model.layers.0.self_attn",
                "queries": [120, 120, 120],
                "recall": [1.0, 0.5, 0.0],
                "error_norm": [0.2, 0.4, 0.6],
                "exact_topk_mass": [0.9, 0.6, 0.3],
                "approx_topk_mass": [0.9, 0.3, 0.0],
            },
            {
                "layer": 1,
                "module": "model.layers.1.self_attn",
                "queries": [80, 80, 0],
                "recall": [0.75, 0.25, None],
                "error_norm": [0.1, 0.3, None],
                "exact_topk_mass": [0.5, 0.7, None],
                "approx_topk_mass": [0.4, 0.2, None],
            },
        ],
        "mass_curve": {
            "k": KS,
            "mass": [[min(1.0, 0.1 * (i + 1)) for i in range(len(KS))], [0.05 * (i + 1) for i in range(len(KS))]],
        },
    }
    stats.update(changes)
    return stats


def nothing_counted():
    stats = make_stats()
    for layer in stats["layers"]:
        layer["queries"] = [0, 0, 0]
        for key in ("recall", "error_norm", "exact_topk_mass", "approx_topk_mass"):
            layer[key] = [None, None, None]
    stats["mass_curve"]["mass"] = [[None] * len(KS), [None] * len(KS)]
    return stats


def assert_one_line(exc_info):
    message = str(exc_info.value)
    assert message and "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------------------------------
# layer table


def test_layer_table_columns_rows_and_population_std():
    table = layer_table(make_stats())
    assert list(table.columns) == [
        "Mean Recall", "Std Recall", "Mean Error Norm", "Std Error Norm", "Exact Top-k Mass", "Approx Top-k Mass",
        "Attended", "Scanned",
    ]
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert table["Attended"].isna().all()  # a statistics file from before the cost was measured: n/a, no error
    assert table.index.name == "Layer"
    assert list(table.index) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]

    row = table.loc["model.layers.0.self_attn"]
    assert row["Mean Recall"] == pytest.approx(0.5)
    assert row["Std Recall"] == pytest.approx(math.sqrt(1 / 6))  # 0.408, ddof=0 (ddof=1 would give 0.5)
    assert row["Mean Error Norm"] == pytest.approx(0.4)
    assert row["Std Error Norm"] == pytest.approx(math.sqrt(0.08 / 3))
    assert row["Exact Top-k Mass"] == pytest.approx(0.6)
    assert row["Approx Top-k Mass"] == pytest.approx(0.4)


def test_cost_columns_average_the_heads_that_counted():
    stats = make_stats()
    for layer in stats["layers"]:
        layer["attended"] = [0.1 * (h + 1) for h in range(len(layer["queries"]))]
        layer["scanned"] = [1.0] * len(layer["queries"])
    row = layer_table(stats).loc["model.layers.1.self_attn"]
    counted = [0.1 * (h + 1) for h, q in enumerate(stats["layers"][1]["queries"]) if q > 0]
    assert row["Attended"] == pytest.approx(sum(counted) / len(counted))
    assert row["Scanned"] == pytest.approx(1.0)


def test_layer_table_skips_heads_without_queries():
    row = layer_table(make_stats()).loc["model.layers.1.self_attn"]
    assert row["Mean Recall"] == pytest.approx(0.5)  # (0.75 + 0.25) / 2, not / 3
    assert row["Std Recall"] == pytest.approx(0.25)
    assert row["Mean Error Norm"] == pytest.approx(0.2)
    assert row["Std Error Norm"] == pytest.approx(0.1)
    assert row["Exact Top-k Mass"] == pytest.approx(0.6)
    assert row["Approx Top-k Mass"] == pytest.approx(0.3)


def test_value_of_a_head_with_zero_queries_is_ignored_even_if_not_none():
    stats = make_stats()
    stats["layers"][1]["recall"][2] = 0.0  # queries is 0: no measurement, whatever the list says
    assert layer_table(stats).loc["model.layers.1.self_attn", "Mean Recall"] == pytest.approx(0.5)


def test_layer_with_no_counted_head_is_nan():
    stats = make_stats()
    layer = stats["layers"][1]
    layer["queries"] = [0, 0, 0]
    for key in ("recall", "error_norm", "exact_topk_mass", "approx_topk_mass"):
        layer[key] = [None, None, None]
    table = layer_table(stats)
    assert table.loc["model.layers.1.self_attn"].isna().all()
    assert table.loc["model.layers.0.self_attn"].drop(["Attended", "Scanned"]).notna().all()
    text = format_recall_table(stats)
    assert "| model.layers.1.self_attn" in text and "n/a" in text
    assert "nan" not in text.lower().replace("n/a", "")


def test_format_recall_table_markdown():
    text = format_recall_table(make_stats())
    lines = text.splitlines()
    header = lines[0]
    for part in ("smollm2-135m", "exact_topk", "k=10", "layerwise_topk_analysis=True", "520 queries counted", "80-120 per counted head"):
        assert part in header, (part, header)
    table_lines = [line for line in lines if line.startswith("|")]
    assert len(table_lines) == 4  # header, separator, 2 layers
    cells = [cell.strip() for cell in table_lines[0].strip("|").split("|")]
    assert cells == ["Layer", *TABLE_COLUMNS]
    row0 = [cell.strip() for cell in table_lines[2].strip("|").split("|")]
    assert row0 == ["model.layers.0.self_attn", "0.500", "0.408", "0.400", "0.163", "0.600", "0.400", "n/a", "n/a"]


def test_nothing_counted_message_instead_of_table():
    text = format_recall_table(nothing_counted())
    assert "No query had at least 100 visible keys (10*k" in text
    assert "lower topk or use longer documents" in text
    assert "|" not in text and "nan" not in text.lower()


# ---------------------------------------------------------------------------------------------------------------------
# files


def test_write_reports_and_round_trip(tmp_path):
    stats = make_stats()
    stats["layers"][0]["recall"][1] = float("nan")  # NaN must become null, the file must stay strict JSON
    out = tmp_path / "new" / "reports"
    paths = write_recall_reports(stats, out)
    names = sorted(p.name for p in paths)
    assert names == sorted([
        "recall_table.md", "recall_stats.json", "exact_topk_attn_ratio.png", "approx_topk_attn_ratio.png",
        "recall_heatmap.png", "topk_mass_curve.png",
    ])
    assert all(p.parent == out and p.is_file() for p in paths)
    assert sorted(p.name for p in out.iterdir()) == names  # no temp files left behind

    text = (out / "recall_stats.json").read_text()
    assert "NaN" not in text
    raw = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-strict JSON constant {name}"))
    assert raw["layers"][0]["recall"] == [1.0, None, 0.0]
    assert text.startswith('{\n "model"')  # indent=1

    loaded = load_recall_stats(out)  # checked once on the way in: a typed RecallStats from here on
    assert loaded.layers[0].recall == (1.0, None, 0.0)
    assert loaded.layers[1].recall == (0.75, 0.25, None)
    assert list(loaded.mass_k) == KS
    assert loaded.to_dict()["layers"][0]["recall"] == [1.0, None, 0.0]
    expected = layer_table(stats)
    pd.testing.assert_frame_equal(layer_table(loaded), expected)
    assert layer_table(loaded).loc["model.layers.0.self_attn", "Mean Recall"] == pytest.approx(0.5)  # 1.0, 0.0
    assert load_recall_stats(out / "recall_stats.json") == loaded
    assert (out / "recall_table.md").read_text().rstrip("\n") == format_recall_table(stats)

    for name in ("exact_topk_attn_ratio.png", "approx_topk_attn_ratio.png", "recall_heatmap.png",
                 "topk_mass_curve.png"):
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5000
        image = mpimg.imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
        assert image.std() > 0.01  # not a blank canvas


def test_load_searches_one_level_down(tmp_path):
    write_recall_reports(make_stats(), tmp_path / "smollm2-135m")
    assert load_recall_stats(tmp_path).model == "smollm2-135m"
    write_recall_reports(make_stats(model="other"), tmp_path / "other")
    with pytest.raises(UserInputError) as info:
        load_recall_stats(tmp_path)
    assert "2 runs" in assert_one_line(info)


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "does not exist"),
        ("", "is empty"),
        ('{"model": "x", ', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_load_errors_are_one_line_and_name_the_path(tmp_path, content, expected):
    path = tmp_path / "odd name" / "recall_stats.json"
    if content is not None:
        path.parent.mkdir()
        path.write_text(content)
    with pytest.raises(UserInputError) as info:
        load_recall_stats(path)
    message = assert_one_line(info)
    assert expected in message and str(path) in message


def test_load_error_for_missing_keys_and_bad_shapes(tmp_path):
    stats = make_stats()
    del stats["mass_curve"]
    (tmp_path / "recall_stats.json").write_text(json.dumps(stats))
    with pytest.raises(UserInputError) as info:
        load_recall_stats(tmp_path)
    message = assert_one_line(info)
    assert "mass_curve" in message and str(tmp_path / "recall_stats.json") in message

    stats = make_stats()
    stats["layers"][1]["error_norm"] = [0.1, 0.3]
    (tmp_path / "recall_stats.json").write_text(json.dumps(stats))
    with pytest.raises(UserInputError) as info:
        load_recall_stats(tmp_path)
    assert "2 error_norm value(s) but 3 query counts" in assert_one_line(info)


def test_load_error_for_empty_folder(tmp_path):
    with pytest.raises(UserInputError) as info:
        load_recall_stats(tmp_path)
    assert "no recall_stats.json" in assert_one_line(info)


def test_write_reports_rejects_invalid_stats_before_writing(tmp_path):
    stats = make_stats()
    stats["layers"][0]["recall"][0] = "high"
    with pytest.raises(UserInputError) as info:
        write_recall_reports(stats, tmp_path / "out")
    assert "recall[0]" in assert_one_line(info)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# plots


def _images(fig):
    return [image for ax in fig.axes for image in ax.get_images()]


@pytest.mark.parametrize("which", ["exact", "approx"])
def test_topk_mass_heatmap_scale_title_and_missing_cells(which):
    fig = topk_mass_heatmap(make_stats(), which)
    (image,) = _images(fig)
    assert image.get_clim() == (0.0, 1.0)
    data = image.get_array()
    assert data.shape == (2, 3)
    key = f"{which}_topk_mass"
    assert float(data[0, 1]) == pytest.approx(make_stats()["layers"][0][key][1])
    assert np.ma.getmaskarray(data)[1, 2] and not np.ma.getmaskarray(data)[0, 2]  # None -> masked (grey) cell
    title = fig.axes[0].get_title()
    assert ("exact top-10 ids" if which == "exact" else "approximate top-10 ids") in title
    assert len(fig.axes) == 2  # heatmap + colorbar


def test_heatmap_rejects_unknown_which():
    with pytest.raises(UserInputError):
        topk_mass_heatmap(make_stats(), "both")


def test_recall_heatmap_scale_and_values():
    fig = recall_heatmap(make_stats())
    (image,) = _images(fig)
    assert image.get_clim() == (0.0, 1.0)
    assert float(image.get_array()[1, 0]) == pytest.approx(0.75)


def test_mass_curve_log2_axis_k_line_and_one_line_per_layer():
    fig = mass_curve(make_stats())
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert ax.xaxis.get_transform().base == 2
    assert ax.get_xlim() == (1.0, 1024.0)
    assert ax.get_ylim()[0] == 0.0 and 1.0 <= ax.get_ylim()[1] <= 1.05
    curves = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
    assert len(curves) == 2
    assert list(curves[1].get_ydata()) == pytest.approx([0.05 * (i + 1) for i in range(len(KS))])
    assert curves[0].get_color() != curves[1].get_color()
    (k_line,) = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert list(k_line.get_xdata()) == [10, 10]


def test_plots_do_not_crash_when_nothing_counted(tmp_path):
    stats = nothing_counted()
    for fig in (topk_mass_heatmap(stats), recall_heatmap(stats), mass_curve(stats)):
        path = save_png(fig, tmp_path / "p.png")
        assert mpimg.imread(path).shape[0] > 100
    assert len(write_recall_reports(stats, tmp_path / "all")) == 6
    assert "No query had" in (tmp_path / "all" / "recall_table.md").read_text()


def test_heatmap_pads_layers_with_fewer_heads():
    stats = make_stats()
    layer = stats["layers"][1]
    for key in ("queries", "recall", "error_norm", "exact_topk_mass", "approx_topk_mass"):
        layer[key] = layer[key][:2]
    (image,) = _images(recall_heatmap(stats))
    assert image.get_array().shape == (2, 3)
    assert np.ma.getmaskarray(image.get_array())[1, 2]


# ---------------------------------------------------------------------------------------------------------------------
# comparison


def make_run_b():
    stats = make_stats(approx="my_ann", layerwise_topk_analysis=False)
    stats["layers"][0]["recall"] = [0.5, 0.5, 0.2]  # mean 0.4
    stats["layers"][0]["error_norm"] = [0.5, 0.5, 0.5]  # mean 0.5
    stats["layers"][0]["approx_topk_mass"] = [0.6, 0.3, 0.0]  # mean 0.3
    return stats


def test_compare_runs_deltas_are_b_minus_a():
    a, b = make_stats(), make_run_b()
    table = compare_runs(a, b)
    assert list(table.columns) == list(COMPARISON_COLUMNS)
    assert list(table.columns) == [
        "Mean Recall A", "Mean Recall B", "Δ Recall",
        "Mean Error Norm A", "Mean Error Norm B", "Δ Error Norm",
        "Approx Top-k Mass A", "Approx Top-k Mass B", "Δ Approx Top-k Mass",
    ]
    assert list(table.index) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    row = table.loc["model.layers.0.self_attn"]
    assert row["Mean Recall A"] == pytest.approx(0.5) and row["Mean Recall B"] == pytest.approx(0.4)
    assert row["Δ Recall"] == pytest.approx(-0.1)
    assert row["Δ Error Norm"] == pytest.approx(0.1)
    assert row["Δ Approx Top-k Mass"] == pytest.approx(-0.1)
    assert (table.loc["model.layers.1.self_attn", ["Δ Recall", "Δ Error Norm"]] == 0).all()


def test_format_comparison_names_both_runs():
    text = format_comparison(make_stats(), make_run_b(), "baseline", "candidate")
    lines = text.splitlines()
    assert lines[0].startswith("- A (baseline):") and "exact_topk" in lines[0] and "=True" in lines[0]
    assert lines[1].startswith("- B (candidate):") and "my_ann" in lines[1] and "=False" in lines[1]
    row = next(line for line in lines if line.startswith("| model.layers.0.self_attn"))
    assert "-0.100" in row and "+0.100" in row
    assert "Δ Recall" in text


@pytest.mark.parametrize(
    "change, expected",
    [
        ("layers", "run A has 2 layers x 3 heads, run B 1 x 3: compare runs of the same model"),
        ("heads", "run A has 2 layers x 3 heads, run B 2 x 2: compare runs of the same model"),
    ],
)
def test_compare_shape_mismatch_is_one_line(change, expected):
    b = make_stats()
    if change == "layers":
        b["layers"] = b["layers"][:1]
        b["mass_curve"]["mass"] = b["mass_curve"]["mass"][:1]
    else:
        for layer in b["layers"]:
            for key in ("queries", "recall", "error_norm", "exact_topk_mass", "approx_topk_mass"):
                layer[key] = layer[key][:2]
    for call in (compare_runs, format_comparison, delta_heatmap):
        with pytest.raises(UserInputError) as info:
            call(make_stats(), b)
        assert assert_one_line(info) == expected


def test_delta_heatmap_diverging_and_centred():
    fig = delta_heatmap(make_stats(), make_run_b())
    (image,) = _images(fig)
    vmin, vmax = image.get_clim()
    assert vmin == -vmax and vmax >= 0.5  # largest |Δ| is 0.5 (head 0 of layer 0)
    data = image.get_array()
    assert float(data[0, 0]) == pytest.approx(-0.5) and float(data[0, 2]) == pytest.approx(0.2)
    assert np.ma.getmaskarray(data)[1, 2]
    assert image.get_cmap().name.startswith("RdBu")


def test_write_comparison(tmp_path, capsys):
    write_recall_reports(make_stats(), tmp_path / "a" / "smollm2-135m")
    write_recall_reports(make_run_b(), tmp_path / "b")
    paths = write_comparison(tmp_path / "a", tmp_path / "b" / "recall_stats.json", tmp_path / "cmp")
    assert [p.name for p in paths] == ["comparison.md", "recall_delta_heatmap.png"]
    text = paths[0].read_text()
    assert str(tmp_path / "a") in text and "Δ Recall" in text
    assert mpimg.imread(paths[1]).shape[0] > 200
    assert capsys.readouterr().out == ""


def test_write_comparison_load_error(tmp_path):
    write_recall_reports(make_stats(), tmp_path / "a")
    with pytest.raises(UserInputError) as info:
        write_comparison(tmp_path / "a", tmp_path / "missing", tmp_path / "cmp")
    assert str(tmp_path / "missing") in assert_one_line(info)
    assert not (tmp_path / "cmp").exists()


def test_inputs_are_not_modified():
    a, b = make_stats(), make_run_b()
    a_copy, b_copy = copy.deepcopy(a), copy.deepcopy(b)
    layer_table(a)
    format_recall_table(a)
    compare_runs(a, b)
    assert a == a_copy and b == b_copy


def test_reports_use_neither_pyplot_nor_torch(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, json\n"
        "from lm_eval_retrieval.report.recall import write_recall_reports\n"
        "from lm_eval_retrieval.report.compare_runs import write_comparison\n"
        f"stats = json.loads({json.dumps(json.dumps(make_stats()))})\n"
        f"write_recall_reports(stats, {str(tmp_path / 'r')!r})\n"
        f"write_comparison({str(tmp_path / 'r')!r}, {str(tmp_path / 'r')!r}, {str(tmp_path / 'c')!r})\n"
        "print(sorted(m for m in ('torch', 'matplotlib.pyplot') if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
