"""Tests for lm_eval_retrieval.report.heads: head-score files as the original tool and its users know them."""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.report import heads as H
from lm_eval_retrieval.report.heads import (
    compare_head_scores,
    format_comparison,
    format_ranking,
    head_shape,
    load_head_scores,
    rank_heads,
    write_head_scores,
)

# The analysis snippet from the original README, verbatim (only the file name is whatever the README used).
SEED_SNIPPET = '''
## load head score file, llama-2-7b-80k for example
import json
import numpy as np
with open('./head_score/llama-2-7b-80k.json') as file:
    head_list = json.loads(file.readline())
## use the average retrieval score and ranking
head_score_list = [([int(ll) for ll in l[0].split("-")],np.mean(l[1])) for l in head_list.items()]
head_score_list = sorted(head_score_list, key=lambda x: x[1], reverse=True) 
top_retrieval_heads = [[l[0],  round(np.mean(l[1]), 2)] for l in head_score_list][:10]
print(top_retrieval_heads)
'''

# 3 layers x 2 heads. Means by hand: 0-0: 0.5, 0-1: (1+0+0.5)/3 = 0.5, 1-0: 0.9, 1-1: [] -> 0.0,
# 2-0: (0.2+0.4)/2 = 0.3, 2-1: 0.5.
SMALL = {
    "0-0": [0.5, 0.5],
    "0-1": [1.0, 0.0, 0.5],
    "1-0": [0.9],
    "1-1": [],
    "2-0": [0.2, 0.4],
    "2-1": [0.5],
}


def _write_raw(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _assert_one_line_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, UserInputError)
    assert message and "\n" not in message and "\r" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ---------------------------------------------------------------------------------------------------------------
# load / shape / rank


def test_load_small_file_and_rank_by_hand(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "m.json", json.dumps(SMALL))
    scores = load_head_scores(path)
    assert scores[(0, 1)] == [1.0, 0.0, 0.5]
    assert scores[(1, 1)] == []
    assert head_shape(scores) == (3, 2)
    ranked = rank_heads(scores)
    # 0.9 first; three heads tie at 0.5 and go in (layer, head) order; then 0.3; the empty head last with 0.0.
    assert [(l, h) for l, h, _ in ranked] == [(1, 0), (0, 0), (0, 1), (2, 1), (2, 0), (1, 1)]
    assert [m for _, _, m in ranked] == pytest.approx([0.9, 0.5, 0.5, 0.5, 0.3, 0.0])


def test_rank_ties_do_not_depend_on_key_order() -> None:
    forward = {(0, 0): [0.5], (0, 1): [0.5], (1, 0): [0.5]}
    backward = dict(reversed(list(forward.items())))
    assert list(backward) != list(forward)
    assert rank_heads(backward) == rank_heads(forward) == [(0, 0, 0.5), (0, 1, 0.5), (1, 0, 0.5)]


def test_empty_score_list_ranks_as_zero_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # np.mean([]) would warn and give NaN
        ranked = rank_heads({(0, 0): [], (0, 1): [0.25]})
    assert ranked == [(0, 1, 0.25), (0, 0, 0.0)]


def test_head_shape_uses_max_index_plus_one() -> None:
    assert head_shape({(0, 0): [], (4, 1): [], (2, 7): []}) == (5, 8)


def test_head_shape_of_nothing_is_an_error() -> None:
    with pytest.raises(UserInputError) as excinfo:
        head_shape({})
    _assert_one_line_error(excinfo, "empty")


def test_pretty_printed_file_is_accepted(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "pretty.json", json.dumps(SMALL, indent=2))
    assert len(path.read_text().splitlines()) > 1
    assert load_head_scores(path) == load_head_scores(_write_raw(tmp_path / "flat.json", json.dumps(SMALL)))


def test_only_first_line_is_read_like_the_seed_snippet(tmp_path: Path) -> None:
    # The seed snippet reads file.readline(); whatever follows a complete first line is ignored there, and here.
    path = _write_raw(tmp_path / "m.json", json.dumps({"0-0": [0.25]}) + "\nnot json at all\n")
    assert load_head_scores(path) == {(0, 0): [0.25]}


def test_integers_in_lists_become_floats(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "m.json", '{"0-0": [1, 0]}')
    scores = load_head_scores(path)
    assert scores == {(0, 0): [1.0, 0.0]}
    assert all(type(x) is float for x in scores[(0, 0)])


# ---------------------------------------------------------------------------------------------------------------
# load errors: every one a single-line UserInputError naming the path


BAD_FILES = {
    "not_json": ("{this is not json", "not valid JSON"),
    "truncated": ('{"0-0": [0.5, 0.', "not valid JSON"),
    "list": ("[[0.5], [0.25]]", "expected a JSON object"),
    "number": ("42", "expected a JSON object"),
    "empty_object": ("{}", "no heads"),
    "key_words": ('{"layer0-head1": [0.5]}', "'<layer>-<head>'"),
    "key_underscore": ('{"0_1": [0.5]}', "'<layer>-<head>'"),
    "key_negative": ('{"-1-2": [0.5]}', "'<layer>-<head>'"),
    "key_three_parts": ('{"1-2-3": [0.5]}', "'<layer>-<head>'"),
    "value_number": ('{"0-0": 0.5}', "expected a list of scores"),
    "value_dict": ('{"0-0": {"a": 1}}', "expected a list of scores"),
    "value_string_item": ('{"0-0": [0.5, "0.7"]}', "non-numeric"),
    "value_bool_item": ('{"0-0": [true]}', "non-numeric"),
    "value_null_item": ('{"0-0": [null]}', "non-numeric"),
    "value_nested_list": ('{"0-0": [[0.5]]}', "non-numeric"),
    "nan": ('{"0-0": [NaN]}', "not valid JSON"),
    "infinity": ('{"0-0": [Infinity]}', "not valid JSON"),
    "duplicate_key": ('{"0-0": [0.5], "0-0": [0.25]}', "appears twice"),
    "duplicate_head": ('{"1-2": [0.5], "01-2": [0.25]}', "appears twice"),
    "blank": ("\n  \n", "empty"),
    "zero_bytes": ("", "empty"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_contents_raise_one_line_user_error(tmp_path: Path, name: str) -> None:
    text, fragment = BAD_FILES[name]
    path = _write_raw(tmp_path / f"{name}.json", text)
    with pytest.raises(UserInputError) as excinfo:
        load_head_scores(path)
    _assert_one_line_error(excinfo, str(path), fragment)


def test_bad_pretty_printed_file_is_one_line_error(tmp_path: Path) -> None:
    # A multi-line broken file: the decoder's message must not drag more lines into ours.
    path = _write_raw(tmp_path / "broken.json", '{\n  "0-0": [0.5,\n  "0-1": [0.25]\n}\n')
    with pytest.raises(UserInputError) as excinfo:
        load_head_scores(path)
    _assert_one_line_error(excinfo, str(path), "not valid JSON")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "head_score" / "nope.json"
    with pytest.raises(UserInputError) as excinfo:
        load_head_scores(path)
    _assert_one_line_error(excinfo, str(path), "does not exist")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(UserInputError) as excinfo:
        load_head_scores(tmp_path)
    _assert_one_line_error(excinfo, str(tmp_path), "directory")


def test_non_utf8_file(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "latin1.json", b'{"0-0": [0.5]} \xff\xfe')
    with pytest.raises(UserInputError) as excinfo:
        load_head_scores(path)
    _assert_one_line_error(excinfo, str(path), "UTF-8")


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated, because chmod 0 does not stop root (tests may run as root in containers).
    path = _write_raw(tmp_path / "secret.json", json.dumps(SMALL))

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(H, "open", denied, raising=False)
    with pytest.raises(UserInputError) as excinfo:
        load_head_scores(path)
    _assert_one_line_error(excinfo, str(path), "cannot read", "Permission denied")


# ---------------------------------------------------------------------------------------------------------------
# format_ranking


def test_format_ranking_table_by_hand() -> None:
    scores = {(0, 0): [0.5, 0.5], (0, 1): [1.0, 0.0, 0.5], (1, 0): [0.9], (1, 1): []}
    assert format_ranking(scores, top=3) == "\n".join(
        [
            "| Rank | Layer | Head | Mean score | Runs |",
            "|---:|---:|---:|---:|---:|",
            "| 1 | 1 | 0 | 0.900 | 1 |",
            "| 2 | 0 | 0 | 0.500 | 2 |",
            "| 3 | 0 | 1 | 0.500 | 3 |",
        ]
    )


def test_format_ranking_default_top_is_ten_and_says_when_no_run_counted() -> None:
    scores = {(layer, head): [] for layer in range(4) for head in range(4)}
    text = format_ranking(scores)
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 10
    assert rows[0] == "| 1 | 0 | 0 | 0.000 | 0 |"
    assert "No run counted" in text
    assert "No run counted" not in format_ranking({(0, 0): [0.5]})


@pytest.mark.parametrize("top", [0, -1, 2.5, "3", True, None])
def test_bad_top_is_user_error(top: object) -> None:
    with pytest.raises(UserInputError) as excinfo:
        format_ranking({(0, 0): [0.5]}, top=top)  # type: ignore[arg-type]
    _assert_one_line_error(excinfo, "top must be a positive integer")
    with pytest.raises(UserInputError):
        compare_head_scores({(0, 0): [0.5]}, {(0, 0): [0.5]}, top=top)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# compare


# 2x2. Means: a = 0-0: 0.9, 0-1: 0.1, 1-0: 0.5, 1-1: 0.3 -> ranking 0-0, 1-0, 1-1, 0-1
#             b = 0-0: 0.2, 0-1: 0.4, 1-0: 0.8, 1-1: 0.6 -> ranking 1-0, 1-1, 0-1, 0-0
A = {(0, 0): [0.8, 1.0], (0, 1): [0.1], (1, 0): [0.5], (1, 1): [0.3]}
B = {(0, 0): [0.2], (0, 1): [0.4], (1, 0): [0.8], (1, 1): [0.6, 0.6]}


def test_compare_overlap_and_spearman_by_hand() -> None:
    result = compare_head_scores(A, B, top=2)
    assert result["shape_a"] == result["shape_b"] == [2, 2]
    assert result["top"] == 2
    # top-2 sets {0-0, 1-0} and {1-0, 1-1} share one head.
    assert result["overlap_count"] == 1
    assert result["overlap_fraction"] == 0.5
    assert result["overlap_heads"] == [[1, 0]]
    assert [x[:2] for x in result["top_a"]] == [[0, 0], [1, 0]]
    assert [x[:2] for x in result["top_b"]] == [[1, 0], [1, 1]]
    # Spearman over heads (0-0, 0-1, 1-0, 1-1): ranks a = 4,1,3,2; b = 1,2,4,3; d = 3,-1,-1,-1; sum d^2 = 12;
    # rho = 1 - 6*12 / (4*(16-1)) = 1 - 72/60 = -0.2.
    assert result["spearman"] == pytest.approx(-0.2)
    assert result["spearman_heads"] == 4
    assert result["spearman_note"] is None
    json.dumps(result)  # the CLI writes it as JSON


def test_compare_identical_is_full_overlap_and_rho_one() -> None:
    result = compare_head_scores(A, A, top=3)
    assert result["overlap_count"] == 3
    assert result["overlap_fraction"] == 1.0
    assert result["spearman"] == pytest.approx(1.0)


def test_compare_top_larger_than_head_count_uses_all_heads() -> None:
    result = compare_head_scores(A, B, top=10)
    assert result["top"] == 4
    assert result["overlap_count"] == 4
    assert result["overlap_fraction"] == 1.0


def test_compare_constant_side_gives_nan_and_says_why() -> None:
    flat = {key: [0.5] for key in B}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's ConstantInputWarning must not be reached
        result = compare_head_scores(A, flat, top=2)
    assert math.isnan(result["spearman"])
    assert "constant" in result["spearman_note"] and " b " in f" {result['spearman_note']} "
    text = format_comparison(result, "a.json", "b.json")
    assert "NaN" in text and "constant" in text


def test_compare_too_few_common_heads_gives_nan() -> None:
    a = {(0, 0): [0.1], (1, 1): [0.9]}
    b = {(0, 1): [0.2], (1, 1): [0.3]}
    result = compare_head_scores(a, b, top=2)
    assert math.isnan(result["spearman"])
    assert result["spearman_heads"] == 1
    assert "1 head" in result["spearman_note"]


def test_compare_different_shapes_is_user_error() -> None:
    a = {(layer, head): [0.5] for layer in range(30) for head in range(9)}
    b = {(layer, head): [0.5] for layer in range(32) for head in range(32)}
    with pytest.raises(UserInputError) as excinfo:
        compare_head_scores(a, b)
    _assert_one_line_error(excinfo, "a is 30x9, b is 32x32", "compare files from the same model")


def test_format_comparison_by_hand() -> None:
    text = format_comparison(compare_head_scores(A, B, top=2), "short.json", "long.json")
    lines = text.splitlines()
    assert "| Rank | short.json | Mean | long.json | Mean |" in lines
    assert "| 1 | 0-0 | 0.900 | 1-0* | 0.800 |" in lines
    assert "| 2 | 1-0* | 0.500 | 1-1 | 0.600 |" in lines
    assert "Overlap of top 2: 1/2 (50%); shared: 1-0" in lines
    spearman = [line for line in lines if line.startswith("Spearman")]
    assert len(spearman) == 1 and "over 4 heads: -0.200" in spearman[0]


def test_format_comparison_escapes_pipes_in_names() -> None:
    text = format_comparison(compare_head_scores(A, B, top=1), "a|b", "c")
    assert "| Rank | a\\|b | Mean | c | Mean |" in text.splitlines()


# ---------------------------------------------------------------------------------------------------------------
# write


def test_write_one_line_layer_major_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "out" / "head_score" / "model.json"  # parent dirs do not exist yet
    scrambled = {"10-0": [0.1], "2-1": [0.5], "2-0": [0.25, 0.75], "0-3": [], "0-10": [1.0]}
    write_head_scores(path, scrambled)
    text = path.read_text(encoding="utf-8")
    assert text.count("\n") == 1 and text.endswith("\n")
    assert list(json.loads(text)) == ["0-3", "0-10", "2-0", "2-1", "10-0"]  # numeric, not string, order
    assert load_head_scores(path) == {
        (0, 3): [],
        (0, 10): [1.0],
        (2, 0): [0.25, 0.75],
        (2, 1): [0.5],
        (10, 0): [0.1],
    }
    assert [p.name for p in path.parent.iterdir()] == ["model.json"]  # no temp file left behind


def test_write_accepts_tuple_keys_and_numpy_numbers(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    write_head_scores(path, {(1, 0): [np.float32(0.5), np.float64(0.25)], (0, 0): [np.int64(1)]})
    assert json.loads(path.read_text()) == {"0-0": [1.0], "1-0": [0.5, 0.25]}


def test_write_overwrites_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    write_head_scores(path, {"0-0": [0.1]})
    write_head_scores(path, {"0-0": [0.9]})
    assert load_head_scores(path) == {(0, 0): [0.9]}


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({}, "no head scores"),
        ({"a-b": [0.5]}, "'<layer>-<head>'"),
        ({(0, -1): [0.5]}, "'<layer>-<head>'"),
        ({"0-0": 0.5}, "expected a list of scores"),
        ({"0-0": [float("nan")]}, "non-finite"),
        ({"0-0": [float("inf")]}, "non-finite"),
        ({"0-0": ["0.5"]}, "non-numeric"),
        ({"0-0": [0.5], (0, 0): [0.25]}, "given twice"),
    ],
)
def test_write_rejects_bad_data_and_leaves_old_file(tmp_path: Path, data: dict, fragment: str) -> None:
    path = tmp_path / "m.json"
    write_head_scores(path, {"0-0": [0.5]})
    before = path.read_bytes()
    with pytest.raises(UserInputError) as excinfo:
        write_head_scores(path, data)
    _assert_one_line_error(excinfo, str(path), fragment)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_write_to_directory_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserInputError) as excinfo:
        write_head_scores(tmp_path, {"0-0": [0.5]})
    _assert_one_line_error(excinfo, str(tmp_path), "directory")


def test_write_under_a_file_is_user_error(tmp_path: Path) -> None:
    blocker = _write_raw(tmp_path / "head_score", "i am a file")
    path = blocker / "model.json"
    with pytest.raises(UserInputError) as excinfo:
        write_head_scores(path, {"0-0": [0.5]})
    _assert_one_line_error(excinfo, str(path), "choose a writable output path")


def test_write_failure_at_replace_keeps_old_file_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.json"
    write_head_scores(path, {"0-0": [0.5]})
    before = path.read_bytes()

    def failing_replace(src: str, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(H.os, "replace", failing_replace)
    with pytest.raises(UserInputError) as excinfo:
        write_head_scores(path, {"0-0": [0.9]})
    _assert_one_line_error(excinfo, str(path), "No space left on device")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


# ---------------------------------------------------------------------------------------------------------------
# the original analysis snippet reads our files unchanged and agrees with rank_heads


def test_seed_snippet_runs_unchanged_on_written_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 4 layers x 3 heads = 12 heads, so the snippet's [:10] really cuts; ties at 0.6 and 0.2 check tie order.
    means = [0.1, 0.6, 0.35, 0.9, 0.6, 0.05, 0.2, 0.75, 0.2, 0.6, 0.45, 0.0]
    data: dict[str, list[float]] = {}
    for index, mean in enumerate(means):
        layer, head = divmod(index, 3)
        data[f"{layer}-{head}"] = [mean - 0.05, mean + 0.05] if 0.05 <= mean <= 0.95 else [mean]
    scrambled = dict(sorted(data.items(), key=lambda kv: kv[0][::-1]))  # any insertion order
    monkeypatch.chdir(tmp_path)
    write_head_scores(Path("head_score") / "llama-2-7b-80k.json", scrambled)

    namespace: dict[str, object] = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(SEED_SNIPPET, "seed_readme_snippet", "exec"), namespace)
    seed_top = namespace["top_retrieval_heads"]
    assert out.getvalue().strip() == str(seed_top)

    ours = rank_heads(load_head_scores(Path("head_score") / "llama-2-7b-80k.json"))[:10]
    assert [head for head, _ in seed_top] == [[layer, head] for layer, head, _ in ours]
    assert [score for _, score in seed_top] == [round(mean, 2) for _, _, mean in ours]
    # and the hand-made order: 0.9 (1-0), 0.75 (2-1), three 0.6 ties by (layer, head), 0.45, 0.35, two 0.2 ties, 0.1
    assert [[layer, head] for layer, head, _ in ours] == [
        [1, 0], [2, 1], [0, 1], [1, 1], [3, 0], [3, 1], [0, 2], [2, 0], [2, 2], [0, 0],
    ]


def test_path_with_newline_still_gives_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "two\nlines.json"
    with pytest.raises(UserInputError) as excinfo:
        load_head_scores(path)
    _assert_one_line_error(excinfo, "does not exist")


def test_import_is_light() -> None:
    # The CLI's `heads` command must start without torch; scipy loads only when a comparison is made.
    import subprocess
    import sys

    code = (
        "import sys, lm_eval_retrieval.report.heads, lm_eval_retrieval.metrics.rouge; "
        "print(sorted(m for m in ('torch', 'scipy', 'rouge_score') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
