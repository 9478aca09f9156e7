"""An independent, slow reference for the retrieval score: eager attention with `output_attentions=True`.

Written from the paper's definition without touching the plugin's probe or tracker: for every decode step take each
head's attention row of the current query, its arg-max key, and count the key as copied when it lies in the answer
span and the prompt token there is the token this step generates. Score = |copied positions| / |span|.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


@torch.no_grad()
def reference_retrieval_scores(model, prompt_ids: list[int], span: tuple[int, int], steps: int):
    """Returns (scores[layer][head] as floats, generated token ids). `model` must run eager attention."""
    assert model.config._attn_implementation == "eager"
    cache = DynamicCache(config=model.config)
    model(torch.tensor([prompt_ids[:-1]]), past_key_values=cache, use_cache=True)
    token = prompt_ids[-1]
    copied: dict[tuple[int, int], set[int]] = {}
    generated = []
    for _ in range(steps):
        out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True, output_attentions=True)
        new_token = int(out.logits[0, -1].argmax())
        total = len(prompt_ids) + len(generated)  # keys seen by this query, counting itself
        for layer, attentions in enumerate(out.attentions):
            row_count = attentions.shape[-1]
            for head in range(attentions.shape[1]):
                row = attentions[0, head, -1]
                key_index = int(row.argmax())
                position = total - row_count + key_index  # sliding-window caches keep only the newest keys
                if span[0] <= position < span[1] and prompt_ids[position] == new_token:
                    copied.setdefault((layer, head), set()).add(position)
        generated.append(new_token)
        token = new_token
    num_layers = len(out.attentions)
    num_heads = out.attentions[0].shape[1]
    width = span[1] - span[0]
    scores = [[len(copied.get((layer, head), ())) / width for head in range(num_heads)] for layer in range(num_layers)]
    return scores, generated


@torch.no_grad()
def reference_translation_scores(model, prompt_ids: list[int], span: tuple[int, int], gold_ids: list[int], steps: int):
    """Translation heads, from the definition: a step is a hit for a head when its arg-max key is in the needle's
    answer span and the generated token is one of the gold (translated) answer's tokens; each gold position is credited
    at most once per head, left to right. Score = |credited gold positions| / |gold|."""
    assert model.config._attn_implementation == "eager"
    cache = DynamicCache(config=model.config)
    model(torch.tensor([prompt_ids[:-1]]), past_key_values=cache, use_cache=True)
    token = prompt_ids[-1]
    credited: dict[tuple[int, int], set[int]] = {}
    generated = []
    for _ in range(steps):
        out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True, output_attentions=True)
        new_token = int(out.logits[0, -1].argmax())
        total = len(prompt_ids) + len(generated)
        for layer, attentions in enumerate(out.attentions):
            for head in range(attentions.shape[1]):
                position = total - attentions.shape[-1] + int(attentions[0, head, -1].argmax())
                if not span[0] <= position < span[1]:
                    continue
                done = credited.setdefault((layer, head), set())
                free = [i for i, gold in enumerate(gold_ids) if gold == new_token and i not in done]
                if free:
                    done.add(free[0])
        generated.append(new_token)
        token = new_token
    num_layers, num_heads = len(out.attentions), out.attentions[0].shape[1]
    scores = [[len(credited.get((layer, head), ())) / len(gold_ids) for head in range(num_heads)] for layer in range(num_layers)]
    return scores, generated


# ----------------------------------------------------------------------------------------------------------------------
# The other head scores (`scores=mass;qr;distant`), each from its paper's definition, with plain loops over the eager
# attention weights. Nothing here imports the plugin.


@torch.no_grad()
def reference_step_rows(model, prompt_ids: list[int], steps: int):
    """Greedy decoding with `output_attentions=True`: per step, per layer, the (heads, K) attention rows of the
    current query and the absolute position of each of their key columns; and the generated tokens."""
    assert model.config._attn_implementation == "eager"
    cache = DynamicCache(config=model.config)
    model(torch.tensor([prompt_ids[:-1]]), past_key_values=cache, use_cache=True)
    token, generated, per_step = prompt_ids[-1], [], []
    for _ in range(steps):
        out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True, output_attentions=True)
        total = len(prompt_ids) + len(generated)  # keys seen by this query, counting itself
        layers = []
        for attentions in out.attentions:
            row_count = attentions.shape[-1]
            layers.append((attentions[0, :, -1].double(), list(range(total - row_count, total))))
        per_step.append(layers)
        generated.append(int(out.logits[0, -1].argmax()))
        token = generated[-1]
    return per_step, generated


def reference_mass_scores(per_step, span: tuple[int, int], counted_steps: int):
    """HeadKV (FYYFU/HeadKV, retrieval_head_detection_r2.py, retrieval_calculate): over the first `counted_steps`
    steps, each of a head's top-|span| keys that lies in the span adds its weight / |span|; summed over steps."""
    width = span[1] - span[0]
    scores = None
    for layers in per_step[:counted_steps]:
        if scores is None:
            scores = [[0.0] * rows.shape[0] for rows, _ in layers]
        for layer, (rows, positions) in enumerate(layers):
            for head in range(rows.shape[0]):
                values, ids = rows[head].topk(min(width, rows.shape[-1]))
                for value, index in zip(values.tolist(), ids.tolist()):
                    if span[0] <= positions[index] < span[1]:
                        scores[layer][head] += value / width
    return scores


def reference_distant_scores(per_step, sink: int, recent: int):
    """DuoAttention's streaming mask (sink keys j < sink, recent keys j > i - recent): the mean over steps of the
    weight a head puts on the other keys."""
    scores = None
    for layers in per_step:
        if scores is None:
            scores = [[0.0] * rows.shape[0] for rows, _ in layers]
        for layer, (rows, positions) in enumerate(layers):
            query = positions[-1]
            for head in range(rows.shape[0]):
                scores[layer][head] += sum(
                    float(w) for w, p in zip(rows[head], positions) if p >= sink and p <= query - recent
                )
    return [[value / len(per_step) for value in row] for row in scores]


@torch.no_grad()
def reference_qr_scores(model, prompt_ids: list[int], null_prompt_ids: list[int], question_start: int,
                        keys: tuple[int, int]):
    """QRHead (princeton-pli/QRHead, attn_retriever.py, score_docs_per_head_for_detection): each whole prompt in one
    eager forward; the mean attention of the rows from `question_start` to the end on each key of `keys`, question
    minus null prompt; per head, keys under mean - 2 std (unbiased) of that difference dropped, the rest summed."""
    assert model.config._attn_implementation == "eager"

    def mean_rows(ids):
        out = model(torch.tensor([ids]), output_attentions=True)
        return [a[0, :, question_start:, keys[0]:keys[1]].double().mean(dim=1) for a in out.attentions]

    question, null = mean_rows(prompt_ids), mean_rows(null_prompt_ids)
    scores = []
    for q_layer, n_layer in zip(question, null):
        row = []
        for head in range(q_layer.shape[0]):
            values = (q_layer[head] - n_layer[head]).tolist()
            mean = sum(values) / len(values)
            std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
            row.append(sum(v for v in values if v > mean - 2 * std))
        scores.append(row)
    return scores
