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
