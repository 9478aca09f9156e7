"""Tiny randomly initialised models of every architecture the hook must serve, built from configs (no download)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
)

VOCAB = 48
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=512)


def tiny_config(arch: str):
    if arch == "llama":
        return LlamaConfig(**COMMON, intermediate_size=96, num_key_value_heads=2)
    if arch == "qwen2":
        return Qwen2Config(**COMMON, intermediate_size=96, num_key_value_heads=2)  # q/k/v biases
    if arch == "mistral":
        return MistralConfig(**COMMON, intermediate_size=96, num_key_value_heads=1, sliding_window=24)
    if arch == "phi3":
        return Phi3Config(**COMMON, intermediate_size=96, num_key_value_heads=2, pad_token_id=0)  # fused qkv
    if arch == "gpt_neox":
        return GPTNeoXConfig(**COMMON, intermediate_size=96)  # fused qkv, partial rotary
    if arch == "gemma3":
        return Gemma3TextConfig(
            **COMMON,
            intermediate_size=96,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=16,
        )
    if arch == "gemma2":  # attention logit soft-capping (eager only: transformers' sdpa refuses softcap)
        return Gemma2Config(
            **COMMON,
            intermediate_size=96,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=16,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
            query_pre_attn_scalar=16,
        )
    raise ValueError(arch)


ARCHITECTURES = ["llama", "qwen2", "mistral", "phi3", "gpt_neox", "gemma3"]
# (architecture, base backend) pairs every hook test runs on
ARCH_BACKENDS = [(arch, base) for arch in ARCHITECTURES for base in ("sdpa", "eager")] + [("gemma2", "eager")]


def tiny_model(arch: str, attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation=attn)
    # Random init gives near-uniform attention; sharper weights make top-1 keys and greedy tokens meaningful.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.dim() == 2:
                param.mul_(4.0)
    return model.eval()
