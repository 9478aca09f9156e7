"""The four head scores of `scores=copy;mass;qr;distant`, each against an independent eager `output_attentions=True`
reference (tests/reference_retrieval.py), and each finding the head planted for it in a tiny model.

The planted model: a tiny random Llama or Qwen2 whose first layer's four heads are rewired through reserved embedding
dimensions (which no other head reads and no layer writes), one pattern per score:
- head 0 attends to the needle's tokens from every query, without copying anything (HeadKV's `mass`);
- head 1 attends to the needle only from the question's tokens (QRHead's `qr`);
- head 2 copies: the query of the token before answer token T_c looks for T_c, and the model is wired to generate
  T1 T2 T3 T4 T1 ... (Wu et al.'s `copy`);
- head 3 is rotary-local: it attends to the last few tokens (DuoAttention's streaming head, `distant` near 0).
"""

from __future__ import annotations

import copy

import pytest
import torch

from lm_eval_retrieval.attention.hook import install_hook
from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.metrics.head_score_distant import DistantScoreTracker
from lm_eval_retrieval.metrics.head_score_mass import MassScoreTracker, qa_f1
from lm_eval_retrieval.metrics.head_score_qr import qr_scores
from lm_eval_retrieval.metrics.head_scores import parse_scores, window_size
from lm_eval_retrieval.metrics.retrieval_score import RetrievalScoreTracker
from lm_eval_retrieval.models.head_trace import ExtraScores, QuestionPlan, traced_decode
from reference_retrieval import (
    reference_distant_scores,
    reference_mass_scores,
    reference_qr_scores,
    reference_retrieval_scores,
    reference_step_rows,
)
from tiny_models import ARCH_BACKENDS, VOCAB, tiny_model

STEPS = 8
SINK, RECENT = 2, 4  # small windows, so that a 60-token prompt has sinks, a recent window and distant keys

NEEDLE, QUESTION, ANSWER, NULL = [36, 37, 38], [39, 40, 41], [42, 43, 44, 45], 47
NEEDLE_DIM, QUESTION_DIM, ON_DIM, NOT_ANSWER_DIM = 0, 1, 2, 3
IS_ANSWER = [4, 5, 6, 7]  # "this token is T_c"
RESERVED = 8


@torch.no_grad()
def planted_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model (eager) with the four planted heads in layer 0: mass, qr, copy, streaming (see the module)."""
    model = tiny_model(arch, attn="eager", seed=seed)
    embedding = model.get_input_embeddings().weight
    embedding[:, :RESERVED] = 0
    embedding[ANSWER, RESERVED:] = 0  # the answer tokens carry nothing else that a random head could match
    embedding[NEEDLE, NEEDLE_DIM] = 1
    embedding[QUESTION, QUESTION_DIM] = 1
    embedding[:, ON_DIM] = 1
    embedding[:, NOT_ANSWER_DIM] = 1
    for token, dim in zip(ANSWER, IS_ANSWER):
        embedding[token, NOT_ANSWER_DIM] = 0
        embedding[token, dim] = 1
    for layer in model.model.layers:  # the reserved dimensions: read only by the planted heads, written by no layer
        layer.self_attn.o_proj.weight[:RESERVED] = 0
        layer.mlp.down_proj.weight[:RESERVED] = 0
        layer.self_attn.q_proj.weight[:, :RESERVED] = 0
        layer.self_attn.k_proj.weight[:, :RESERVED] = 0
    attention = model.model.layers[0].self_attn
    q, k, d = attention.q_proj, attention.k_proj, attention.head_dim
    assert d == 16 and model.config.num_key_value_heads == 2  # heads 0, 1 read KV head 0; heads 2, 3 KV head 1
    q.weight.zero_()
    k.weight.zero_()
    if q.bias is not None:
        q.bias.zero_()
        k.bias.zero_()
    # dims 7 / 15 are the slowest rotary pair: there the logit hardly depends on position
    k.weight[7, NEEDLE_DIM] = 2.0  # KV head 0: the needle
    q.weight[7, ON_DIM] = 2.0  # head 0: every query looks at the needle (mass)
    q.weight[d + 7, QUESTION_DIM] = 2.0  # head 1: only the question's queries do (qr)
    # head 2 (copy): query in dim j, key in dim j + 8 of a slow pair gives logit ~ sin(theta * distance), so among
    # equal tokens the farthest wins: the prompt's T_c, not the copies the model generated
    looks_for = [[NOT_ANSWER_DIM, IS_ANSWER[3]], [IS_ANSWER[0]], [IS_ANSWER[1]], [IS_ANSWER[2]]]
    for c, j in enumerate([4, 5, 6, 7]):
        k.weight[d + j + 8, IS_ANSWER[c]] = 3.0
        for source in looks_for[c]:
            q.weight[2 * d + j, source] = 3.0
    for i in range(4):  # head 3 (streaming): q = k in the four fastest pairs peaks at distance 0
        for j in (i, i + 8):
            k.weight[d + j, ON_DIM] = 1.0
            q.weight[3 * d + j, ON_DIM] = 1.0
    head = model.lm_head.weight  # generation: T1 after any other token, T_{c+1} after T_c
    head[ANSWER[0], NOT_ANSWER_DIM] = 60.0
    for c in range(4):
        head[ANSWER[(c + 1) % 4], IS_ANSWER[c]] = 60.0
    return model


def planted_prompt(seed: int = 0) -> dict:
    """Haystack, needle (with the answer T1..T4 inside), haystack, question, a two-token answer cue."""
    generator = torch.Generator().manual_seed(seed)

    def haystack(n: int) -> list[int]:
        return torch.randint(1, 36, (n,), generator=generator).tolist()

    before, after, cue = haystack(20), haystack(20), haystack(2)
    needle = NEEDLE[:2] + ANSWER + NEEDLE[2:]
    ids = before + needle + after + QUESTION + cue
    start = len(before)
    question = start + len(needle) + len(after)
    return {
        "ids": ids,
        "needle": (start, start + len(needle)),
        "answer": (start + 2, start + 6),
        "question": question,
        "null_ids": ids[:question] + [NULL] + cue,  # the question replaced by the null query
    }


def random_prompt(seed: int) -> dict:
    """A random prompt with the same layout, for models with no planted heads."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (50,), generator=generator).tolist()
    return {"ids": ids, "needle": (14, 22), "answer": (16, 19), "question": 44, "null_ids": ids[:44] + [NULL, 3] + ids[-2:]}


def plugin_scores(model: torch.nn.Module, base: str, prompt: dict) -> tuple[dict[str, torch.Tensor], list[int]]:
    """All four scores through the detection's own decode loop (one pass), on a hooked copy of `model`."""
    hooked = copy.deepcopy(model)
    if base != "eager":
        hooked.set_attn_implementation(base)
    state = install_hook(hooked, base)
    layers, heads = state.num_layers, state.num_heads
    ids = torch.tensor(prompt["ids"])
    tracker = RetrievalScoreTracker(ids, prompt["answer"], layers, heads)
    extras = ExtraScores(
        mass=MassScoreTracker(prompt["needle"], STEPS, layers, heads),
        distant=DistantScoreTracker(SINK, RECENT, layers, heads),
        question=QuestionPlan(prompt["question"], torch.tensor(prompt["null_ids"][prompt["question"]:]), prompt["needle"]),
    )
    generated = traced_decode(hooked, state, ids, tracker, STEPS, lambda tokens: False, extras)
    rows = extras.question.probe
    scores = {
        "copy": tracker.scores(),
        "mass": extras.mass.scores(),
        "qr": qr_scores(rows.mean("question"), rows.mean("null")),
        "distant": extras.distant.scores(),
    }
    assert not state.probes, "every probe is removed after the document"
    return scores, generated


def reference_scores(model: torch.nn.Module, prompt: dict) -> tuple[dict[str, torch.Tensor], list[int]]:
    per_step, generated = reference_step_rows(model, prompt["ids"], STEPS)
    copied, copy_tokens = reference_retrieval_scores(model, prompt["ids"], prompt["answer"], STEPS)
    assert copy_tokens == generated
    scores = {
        "copy": copied,
        "mass": reference_mass_scores(per_step, prompt["needle"], STEPS),
        "qr": reference_qr_scores(model, prompt["ids"], prompt["null_ids"], prompt["question"], prompt["needle"]),
        "distant": reference_distant_scores(per_step, SINK, RECENT),
    }
    return {name: torch.tensor(value, dtype=torch.float64) for name, value in scores.items()}, generated


def _assert_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_each_score_ranks_its_planted_head_first(arch: str) -> None:
    model, prompt = planted_model(arch), planted_prompt()
    got, generated = plugin_scores(model, "sdpa", prompt)
    expected, reference_tokens = reference_scores(model, prompt)
    assert generated == reference_tokens == (ANSWER * 2)[:STEPS]
    _assert_equal(got, expected)
    planted = {"mass": 0, "qr": 1, "copy": 2}
    for name, head in planted.items():
        flat = got[name].flatten()
        order = flat.argsort(descending=True).tolist()
        assert order[0] == head and flat[order[0]] > flat[order[1]], f"{name}: {got[name]}"
    distant = got["distant"].flatten()  # the streaming head keeps (almost) nothing outside sinks and recent window
    order = distant.argsort().tolist()
    assert order[0] == 3 and distant[3] < 0.05 < distant[order[1]], got["distant"]
    assert got["copy"][0, 2] == 1.0 and got["copy"][0, 0] == 0.0, "the mass head attends without copying"


@pytest.mark.parametrize(("arch", "base"), ARCH_BACKENDS)
def test_scores_equal_eager_reference(arch: str, base: str) -> None:
    """Random weights, every architecture and backend: sliding windows (Mistral, Gemma3) leave the needle outside
    some layers' keys, fused QKV, partial rotary, soft-capping (Gemma2)."""
    model = tiny_model(arch, attn="eager", seed=3)
    prompt = random_prompt(seed=1)
    got, generated = plugin_scores(model, base, prompt)
    expected, reference_tokens = reference_scores(model, prompt)
    assert generated == reference_tokens
    _assert_equal(got, expected)
    assert (got["distant"] > 0).all() and (got["mass"] >= 0).all() and (got["qr"] != 0).any()


# ----------------------------------------------------------------------------------------------------------------------
# the rules on hand-made numbers


def test_mass_counts_top_k_weight_in_the_span_for_its_first_steps_only() -> None:
    tracker = MassScoreTracker((2, 4), steps=2, num_layers=1, num_heads=2)
    rows = torch.tensor([[[0.1, 0.2, 0.6, 0.1, 0.0], [0.5, 0.05, 0.05, 0.05, 0.35]]])
    # keys at positions -2..2: only column 4 is in the span; it is among head 1's top 2 (0.5, 0.35), not head 0's
    tracker.update(rows, first_position=-2)
    # positions 0..4: columns 2, 3 in the span; head 0's top 2 are columns 2 (0.6) and 1, head 1's columns 0 and 4
    tracker.update(rows, first_position=0)
    tracker.update(rows, first_position=0)  # a third step: past the first `steps`, not counted
    assert tracker.scores().tolist() == [[pytest.approx(0.6 / 2), pytest.approx(0.35 / 2)]]


def test_distant_mass_is_what_sinks_and_the_recent_window_leave() -> None:
    tracker = DistantScoreTracker(sink_tokens=1, recent_tokens=2, num_layers=1, num_heads=1)
    tracker.update(torch.tensor([[[0.4, 0.1, 0.2, 0.1, 0.2]]]), first_position=0)  # distant: keys 1, 2
    tracker.update(torch.tensor([[[0.4, 0.1, 0.2, 0.1, 0.2]]]), first_position=3)  # keys at 3..7: distant 3..5
    tracker.update(torch.tensor([[[0.5, 0.5]]]), first_position=0)  # too short to have distant keys
    assert tracker.scores().item() == pytest.approx((0.3 + 0.7 + 0.0) / 3)


def test_qr_subtracts_the_null_query_and_drops_outliers_below_mean_minus_two_std() -> None:
    question = torch.tensor([[[0.30, 0.30, 0.30, 0.30, 0.30, 0.30, -0.90]]])
    null = torch.zeros_like(question)
    # mean 0.129, std 0.454: -0.9 is below mean - 2 std and dropped; the rest summed
    assert qr_scores(question, null).item() == pytest.approx(1.8)
    assert qr_scores(question, question).item() == 0.0
    assert qr_scores(question[..., :1], null[..., :1]).item() == 0.0  # one token: QRHead's std is NaN, nothing passes


def test_qa_f1_is_longbench_token_f1() -> None:
    assert qa_f1("The password is purple walrus seventeen.", "purple walrus seventeen") == pytest.approx(
        100 * 2 * (3 / 5) * 1 / (3 / 5 + 1)  # "the" dropped: 5 words predicted, 3 right
    )
    assert qa_f1("Purple, walrus; SEVENTEEN!", "purple walrus seventeen") == 100.0
    assert qa_f1("nothing", "purple walrus seventeen") == 0.0
    assert qa_f1("答案是紫色海象", "紫色海象", "zh") > 50


def test_scores_arg_parsing_and_bad_input() -> None:
    assert parse_scores("copy") == ("copy",)
    assert parse_scores("distant;copy; qr;mass") == ("copy", "mass", "qr", "distant")
    for bad in ("foo", "copy;foo", "", ";"):
        with pytest.raises(UserInputError) as error:
            parse_scores(bad)
        message = str(error.value)
        assert "\n" not in message and "copy;mass;qr;distant" in message
    assert window_size("sink_tokens", "64") == 64
    for bad in ("x", -1, 2.5, True):
        with pytest.raises(UserInputError, match="sink_tokens"):
            window_size("sink_tokens", bad)
    with pytest.raises(UserInputError, match=r"recent_tokens must be >= 1, got 0"):
        window_size("recent_tokens", 0, minimum=1)


# ----------------------------------------------------------------------------------------------------------------------
# through retrieval-head-hf


def test_bad_scores_fail_before_the_model_loads() -> None:
    from lm_eval_retrieval.models.head_trace import RetrievalHeadLM

    for args, text in [({"scores": "copy;foo"}, "unknown scores='foo'"), ({"sink_tokens": "x"}, "sink_tokens"),
                       ({"recent_tokens": 0}, "recent_tokens must be >= 1")]:
        with pytest.raises(UserInputError, match=text):
            RetrievalHeadLM(pretrained="/nonexistent/model", **args)


def test_one_pass_writes_one_file_per_score(tiny_model_dir, english_sentences, tmp_path) -> None:
    from lm_eval_retrieval.haystack import build_document, get_needles
    from lm_eval_retrieval.models.head_trace import RetrievalHeadLM
    from lm_eval_retrieval.report.heads import load_head_scores

    lm = RetrievalHeadLM(pretrained=tiny_model_dir, output_path=str(tmp_path), scores="copy;distant",
                         sink_tokens=4, recent_tokens=16, qr="", mass="", max_new_tokens=6)  # the comma form too
    assert lm.score_names == ("copy", "mass", "qr", "distant")
    doc = build_document(lm.tokenizer, english_sentences, get_needles("en")[0], 200, 50.0)
    encoded = lm.tokenizer(doc["input"], return_offsets_mapping=True, add_special_tokens=False)
    plan = lm._extra_scores(doc["input"], encoded["offset_mapping"], 0, (0, 1), doc).question
    assert lm.tokenizer.decode(encoded["input_ids"][plan.start:]).strip().startswith(doc["question"])
    null_prompt = encoded["input_ids"][:plan.start] + plan.null_ids.tolist()
    assert lm.tokenizer.decode(null_prompt) == doc["input"].replace(doc["question"], "N/A")
    assert lm.tokenizer.decode(encoded["input_ids"][slice(*plan.keys)]).strip() == doc["needle"].strip()
    lm.trace_document(doc["input"], doc, {"until": ["\n"]})
    lm._report()
    folder = tmp_path / "head_score"
    name = lm.model_name
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{name}.json", f"{name}.mass.json", f"{name}.qr.json", f"{name}.distant.json"]
    )
    # a random model answers wrong: copy and mass (answer-gated) count nothing, qr and distant count every document
    assert [lm.counted(s) for s in lm.score_names] == [0, 0, 1, 1]
    for score in ("qr", "distant"):
        scores = load_head_scores(folder / f"{name}.{score}.json")
        assert len(scores) == 2 * 4 and all(len(v) == 1 for v in scores.values())
    info = lm.get_model_info()["retrieval_heads"]["scores"]
    assert set(info) == set(lm.score_names)
    assert "QA-F1" in info["mass"]["gate"] and "ROUGE-1" in info["copy"]["gate"]
    assert info["distant"]["sink_tokens"] == 4 and info["distant"]["recent_tokens"] == 16
    assert info["qr"]["documents_counted"] == 1 and len(info["qr"]["top_heads"]) == 8

    lm.output_dir, lm.score_names = str(tmp_path / "default"), ("copy",)  # the default: today's one file
    lm._report()
    assert [p.name for p in (tmp_path / "default" / "head_score").iterdir()] == [f"{name}.json"]
