"""Registers the plugin's models with lm-eval as lazy targets (no torch import until a model is built)."""

from __future__ import annotations

MODELS = {
    "retrieval-head-hf": "lm_eval_retrieval.models.head_trace:RetrievalHeadLM",
    "ret-approx-hf": "lm_eval_retrieval.models.ret_approx:RetApproxLM",
}


def register_models() -> None:
    # lm-eval only imports its built-in models when the registry is empty; register ours after them, or `hf` vanishes.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry

    for name, target in MODELS.items():
        if name not in model_registry:
            model_registry.register(name, target=target)
