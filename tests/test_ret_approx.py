"""`ret-approx-hf` through lm-eval's own request path (HFLM batching, right padding), on a tiny saved model."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.models.ret_approx import RetApproxLM

TEXTS = [
    "The lighthouse stood on the rock for a hundred years, and every night its lamp turned slowly over the sea. " * 3,
    "Short text about a cat that sat on a mat near the door.",
    "Numbers are easy: one two three four five six seven eight nine ten eleven twelve thirteen fourteen. " * 2,
]


def _requests(texts=TEXTS) -> list[Instance]:
    return [
        Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=i, metadata=("t", i, 1))
        for i, text in enumerate(texts)
    ]


def _lm(tiny_model_dir: str, tmp_path: Path, **kwargs) -> RetApproxLM:
    kwargs.setdefault("topk", 2)
    kwargs.setdefault("min_visible_keys", 4)
    return RetApproxLM(pretrained=tiny_model_dir, output_path=str(tmp_path), dtype="float32", **kwargs)


def _plain_rolling(lm: RetApproxLM) -> list[float]:
    probes = list(lm.hook_state.probes)
    lm.hook_state.probes[:] = []
    try:
        return lm.loglikelihood_rolling(_requests())
    finally:
        lm.hook_state.probes[:] = probes


def test_layerwise_keeps_metrics_and_batches_count_no_padding(tiny_model_dir: str, tmp_path: Path) -> None:
    one = _lm(tiny_model_dir, tmp_path / "one", batch_size=1)
    three = _lm(tiny_model_dir, tmp_path / "three", batch_size=3)
    plain = _plain_rolling(one)
    assert one.loglikelihood_rolling(_requests()) == pytest.approx(plain, abs=1e-4)
    assert three.loglikelihood_rolling(_requests()) == pytest.approx(plain, abs=1e-4)
    # Right-padded batches of 3 must count exactly the queries of unpadded single requests.
    assert torch.equal(one.probe.stats.queries, three.probe.stats.queries)
    for name in one.probe.stats.FIELDS:
        torch.testing.assert_close(one.probe.stats.means(name), three.probe.stats.means(name), atol=1e-5, rtol=0)
    assert torch.all(one.probe.stats.means("recall") == 1.0)


def test_end_to_end_mode_moves_the_metric(tiny_model_dir: str, tmp_path: Path) -> None:
    lm = _lm(tiny_model_dir, tmp_path, approx="simhash", layerwise_topk_analysis="False")
    plain = _plain_rolling(lm)
    approximate = lm.loglikelihood_rolling(_requests())
    assert max(abs(a - b) for a, b in zip(approximate, plain)) > 1e-3


def test_reports_are_written_beside_the_results(tiny_model_dir: str, tmp_path: Path) -> None:
    lm = _lm(tiny_model_dir, tmp_path, approx="simhash")
    lm.loglikelihood_rolling(_requests())
    folder = Path(lm.report_dir)
    table = (folder / "recall_table.md").read_text()
    assert "model.layers.0.self_attn" in table and "model.layers.1.self_attn" in table
    for png in ("exact_topk_attn_ratio.png", "approx_topk_attn_ratio.png", "recall_heatmap.png", "topk_mass_curve.png"):
        assert (folder / png).stat().st_size > 1000
    info = lm.get_model_info()["retrieval_approx"]
    assert info["approx"] == "simhash" and len(info["layers"]) == 2 and sum(info["layers"][0]["queries"]) > 0


def test_user_approx_from_model_args(tiny_model_dir: str, tmp_path: Path) -> None:
    lm = _lm(tiny_model_dir, tmp_path, approx="user_approx:first_keys", min_visible_keys=40)
    lm.loglikelihood_rolling(_requests())
    recall = float(lm.probe.stats.means("recall").nanmean())
    assert recall < 0.2, "retrieving the first 2 of >= 40 keys finds the true top-2 rarely"


def test_method_type_on_one_module_takes_effect(tiny_model_dir: str, tmp_path: Path) -> None:
    from user_approx import first_keys

    lm = _lm(tiny_model_dir, tmp_path, min_visible_keys=40)
    layer1 = lm.attention_modules()[1]
    layer1._approx_attn = types.MethodType(first_keys, layer1)
    lm.loglikelihood_rolling(_requests())
    recall = lm.probe.stats.means("recall")
    assert torch.all(recall[0] == 1.0) and float(recall[1].mean()) < 0.2


def test_seed_idiom_attn_is_exact(tiny_model_dir: str, tmp_path: Path) -> None:
    lm = _lm(tiny_model_dir, tmp_path, approx="simhash")
    for module in lm.attention_modules():
        module._approx_attn = types.MethodType(module._attn, module)
    lm.loglikelihood_rolling(_requests())
    assert torch.all(lm.probe.stats.means("recall") == 1.0)
    assert float(lm.probe.stats.means("error_norm").max()) < 1e-5


def readme_example() -> str:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    return re.search(r"```python\n(# my_approx\.py\n.*?)```", readme, re.S).group(1)


def test_readme_subclass_example_runs(tiny_model_dir: str, tmp_path: Path) -> None:
    code = readme_example()
    assert len(code.strip().splitlines()) < 25
    module = types.ModuleType("my_approx")
    exec(compile(code, "README.md", "exec"), module.__dict__)
    from lm_eval.api.registry import get_model

    cls = get_model("recent-approx-hf")
    lm = cls(pretrained=tiny_model_dir, output_path=str(tmp_path), topk=2, min_visible_keys=20, dtype="float32")
    lm.loglikelihood_rolling(_requests())
    assert lm.probe.approx_name == "most_recent_keys"
    recall = float(lm.probe.stats.means("recall").nanmean())
    assert 0.0 < recall < 1.0


def test_topk_larger_than_any_sequence_counts_nothing_and_says_so(tiny_model_dir: str, tmp_path: Path, caplog) -> None:
    lm = _lm(tiny_model_dir, tmp_path, topk=500, min_visible_keys=None)
    with caplog.at_level("WARNING"):
        lm.loglikelihood_rolling(_requests())
    assert int(lm.probe.stats.queries.sum()) == 0
    assert "no query had at least 5000 visible keys" in caplog.text
    assert "No query had at least 5000 visible keys" in (Path(lm.report_dir) / "recall_table.md").read_text()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"topk": 0}, "topk must be a positive number of keys (e.g. topk=128) or a share of the visible keys (e.g. topk=5%), got 0"),
        ({"topk": "0.5"}, "topk must be a positive number of keys"),
        ({"approx": "no_such_module:fn"}, "approx='no_such_module:fn' cannot be imported"),
        ({"approx": "fancy"}, "neither a built-in"),
        ({"topkk": 3}, "unknown model_args key(s) 'topkk'"),
    ],
)
def test_bad_model_args(tiny_model_dir: str, tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(UserInputError) as info:
        _lm(tiny_model_dir, tmp_path, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_generate_until_counts_prefill_and_every_decode_step(tiny_model_dir: str, tmp_path: Path) -> None:
    lm = _lm(tiny_model_dir, tmp_path, batch_size=2, min_visible_keys=8)
    prompts = [TEXTS[0], TEXTS[1]]
    lengths = [len(lm.tok_encode(p)) for p in prompts]
    new_tokens = 6
    requests = [
        Instance(
            request_type="generate_until", doc={}, idx=i, metadata=("t", i, 1),
            arguments=(p, {"until": ["@@@@"], "max_gen_toks": new_tokens, "do_sample": False}),
        )
        for i, p in enumerate(prompts)
    ]
    outputs = lm.generate_until(requests)
    assert len(outputs) == 2
    # Left padding adds neither keys nor queries: each prompt counts its own queries with >= 8 visible keys, then
    # one query per decode step (the first new token comes from the prefill).
    expected = sum(n - 8 + 1 for n in lengths) + 2 * (new_tokens - 1)
    assert int(lm.probe.stats.queries[0, 0]) == expected
