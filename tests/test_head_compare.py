"""`lm-eval-retrieval heads A B C ... --compare`: the top-10 / top-20 overlap and Spearman matrix of several head-score
files, against values counted by hand, and the scoring-method names read from the file names."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy.stats import spearmanr

from lm_eval_retrieval.cli import main
from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.report.heads import compare_many, format_matrix, method_labels, score_label

# 5 layers x 5 heads; head i is (i // 5, i % 5). Each file is given as its ranking of head indices, best first.
N = 25
ORDER_A = list(range(N))  # 0, 1, ..., 24
ORDER_B = ORDER_A[::-1]  # 24, 23, ..., 0
ORDER_C = [*range(5, 15), *range(0, 5), *range(15, 25)]


def scores_of(order: list[int]) -> dict[tuple[int, int], list[float]]:
    """Mean score N - rank (as two runs whose mean it is), so the ranking is `order`."""
    return {(i // 5, i % 5): [N - rank + 0.25, N - rank - 0.25] for rank, i in enumerate(order)}


def rank_of(order: list[int]) -> list[int]:
    ranks = [0] * N
    for rank, i in enumerate(order):
        ranks[i] = rank
    return ranks


def write(path: Path, order: list[int]) -> str:
    path.write_text(json.dumps({f"{l}-{h}": v for (l, h), v in scores_of(order).items()}) + "\n")
    return str(path)


@pytest.fixture()
def files(tmp_path: Path) -> list[str]:
    return [
        write(tmp_path / "model.json", ORDER_A),
        write(tmp_path / "model.mass.json", ORDER_B),
        write(tmp_path / "model.qr.json", ORDER_C),
    ]


def test_overlap_and_spearman_by_hand() -> None:
    result = compare_many([("a", scores_of(ORDER_A)), ("b", scores_of(ORDER_B)), ("c", scores_of(ORDER_C))])
    # top 10: A {0..9}, B {15..24}, C {5..14}; top 20: A {0..19}, B {5..24}, C {0..19}
    assert result["overlap"][10] == [[10, 0, 5], [0, 10, 0], [5, 0, 10]]
    assert result["overlap"][20] == [[20, 15, 20], [15, 20, 15], [20, 15, 20]]
    rho = result["spearman"]
    assert rho[0][0] == pytest.approx(1.0) and rho[0][1] == pytest.approx(-1.0)
    # A vs C: heads 5..14 move up 5 ranks, heads 0..4 down 10; sum d^2 = 10 * 25 + 5 * 100 = 750, no ties
    assert rho[0][2] == pytest.approx(1 - 6 * 750 / (N * (N * N - 1)))
    ranks = {name: rank_of(order) for name, order in (("a", ORDER_A), ("b", ORDER_B), ("c", ORDER_C))}
    d2 = sum((x - y) ** 2 for x, y in zip(ranks["b"], ranks["c"]))
    assert rho[1][2] == pytest.approx(1 - 6 * d2 / (N * (N * N - 1)))
    assert rho[1][2] == pytest.approx(spearmanr(ranks["b"], ranks["c"]).statistic)
    assert rho == [list(row) for row in zip(*rho)], "the matrix is symmetric"
    assert result["names"] == ["a", "b", "c"] and result["shape"] == [5, 5]


def test_overlap_k_is_capped_at_the_number_of_heads() -> None:
    small = {(0, h): [float(h)] for h in range(6)}
    result = compare_many([("x", small), ("y", {k: [-v[0]] for k, v in small.items()})])
    assert result["overlap_k"] == {10: 6, 20: 6}
    assert result["overlap"][10] == [[6, 6], [6, 6]]
    assert format_matrix(result).count("Top-6 overlap") == 1, "one table when k = 10 and k = 20 are the same"


def test_constant_file_gives_nan_with_its_reason() -> None:
    flat = {(i // 5, i % 5): [0.5] for i in range(N)}
    result = compare_many([("a", scores_of(ORDER_A)), ("flat", flat)])
    assert math.isnan(result["spearman"][0][1]) and math.isnan(result["spearman"][1][1])
    text = format_matrix(result)
    assert "| a | 1.000 | NaN |" in text and "NaN for a / flat: undefined" in text


def test_score_labels_from_file_names() -> None:
    assert score_label("head_score/smollm2-135m.json") == "copy"
    assert score_label("head_score/smollm2-135m.mass.json") == "mass"
    assert score_label("head_score/smollm2-135m.distant.json") == "distant"
    assert score_label("Qwen2.5-3B-Instruct.json") == "copy"
    assert score_label("Mistral-7B-v0.2-hf.json") == "copy"
    assert score_label("Qwen2.5-3B-Instruct.qr.json") == "qr"
    assert method_labels(["a/m.json", "a/m.mass.json"]) == ["copy", "mass"]
    assert method_labels(["a/m1.json", "b/m2.json"]) == ["copy (m1)", "copy (m2)"]
    assert method_labels(["a/m.json", "b/m.json"]) == ["copy (m) #1", "copy (m) #2"]


def test_cli_prints_the_matrix(files: list[str], capsys) -> None:
    assert main(["heads", *files, "--compare"]) == 0
    out = capsys.readouterr().out
    assert "| Rank | copy | mass | qr |" in out
    assert "| 1 | 0-0 25.000 | 4-4 25.000 | 1-0 25.000 |" in out
    top10 = out.split("Top-10 overlap")[1]
    assert "| copy | 10 | 0 | 5 |" in top10.split("Top-20")[0]
    assert "| mass | 15 | 20 | 15 |" in out.split("Top-20 overlap")[1]
    assert "| copy | 1.000 | -1.000 | 0.712 |" in out.split("Spearman")[1]
    # the flag in front of the files reads the same
    assert main(["heads", files[0], "--compare", *files[1:]]) == 0
    assert capsys.readouterr().out == out


def test_two_files_keep_the_side_by_side_comparison(files: list[str], capsys) -> None:
    assert main(["heads", files[0], "--compare", files[2], "--top", "10"]) == 0
    before = capsys.readouterr().out
    assert "Overlap of top 10: 5/10" in before
    assert main(["heads", files[0], files[2], "--compare", "--top", "10"]) == 0
    assert capsys.readouterr().out == before
    assert main(["heads", files[0], "--top", "3"]) == 0
    assert "| 3 | 0 | 2 | 23.000 | 2 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["heads", "{0}", "{1}"], "to compare several add --compare"),
        (["heads", "{0}", "--compare"], "--compare needs at least two head-score files"),
        (["heads"], "give a head-score file"),
        (["heads", "{0}", "{1}", "{missing}", "--compare"], "does not exist"),
        (["heads", "{0}", "{1}", "{other}", "--compare"], "head-score shapes differ"),
        (["heads", "{0}", "{1}", "{2}", "--compare", "--top", "0"], "--top must be a positive number"),
    ],
)
def test_bad_input_is_one_line(argv: list[str], message: str, files: list[str], tmp_path: Path, capsys) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"0-0": [1.0], "1-1": [0.5]}))
    words = [w.format(*files, missing=tmp_path / "missing.json", other=other) for w in argv]
    assert main(words) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_compare_many_needs_two() -> None:
    with pytest.raises(UserInputError, match="at least two"):
        compare_many([("a", scores_of(ORDER_A))])
