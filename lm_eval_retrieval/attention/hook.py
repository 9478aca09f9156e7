"""The one place that touches a model's attention.

Every modern transformers model fetches its attention function from `ALL_ATTENTION_FUNCTIONS` by the name in
`config._attn_implementation`. We register one function per base backend (`lmr_sdpa`, `lmr_eager`, ...) together with
the matching mask function (a custom name without one gets no causal mask at all), switch the model to that name, and
the function computes the layer's true output with the base backend before handing `(query, key, value, mask)` to
whatever probes are active. With no probe, the model computes exactly what it computed before.

Nothing here knows any architecture: the model's own eager function is looked up next to its attention class, so
Gemma's soft-capping, GPT-NeoX's fused projections or Qwen2's biases stay the model's business.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from ..errors import UserInputError
from .approx.common import exact_attention

HOOK_PREFIX = "lmr_"
BASE_BACKENDS = ("sdpa", "eager", "flash_attention_2")


class Probe(Protocol):
    """Something that looks at (and may rewrite) one attention call.

    `before` may return a replacement query (masking zeroes a head's query); `after` sees the exact output and may
    return a replacement output (approximations hand theirs on). Either may return None to leave things as they are.

    A probe that scores every key anyway may also have `attend(call) -> output (B, Q, Hq, D)`: the hook then asks it
    for the layer's exact output instead of calling the backend (returning None hands the call back to it). The hook
    asks only over sdpa in float32 (see `may_skip_backend`); `ApproxProbe.attend` runs sdpa's own CPU kernel, so its
    output is sdpa's bit for bit.
    """

    def before(self, call: "AttentionCall") -> torch.Tensor | None: ...

    def after(self, call: "AttentionCall", output: torch.Tensor) -> torch.Tensor | None: ...


@dataclass
class AttentionCall:
    """What one attention call saw; `query` is (B, Hq, Q, D), `key`/`value` (B, Hkv, K, D), output (B, Q, Hq, D)."""

    module: nn.Module
    layer: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    scaling: float
    kwargs: dict[str, Any]

    @property
    def num_kv_groups(self) -> int:
        return self.query.shape[1] // self.key.shape[1]


@dataclass
class HookState:
    """Shared by all hooked modules of one model: the probes that are active now."""

    probes: list[Any] = field(default_factory=list)
    num_layers: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    module_names: list[str] = field(default_factory=list)
    # Probes may compute the exact output themselves (see Probe.attend) only over the sdpa backend: eager is what a
    # user picks to get the model's own arithmetic, and flash runs in half precision.
    may_attend: bool = False


@contextmanager
def probes_replaced(state: HookState, probes: list[Any]) -> Iterator[None]:
    """Run with only `probes` active (none: the plain model), then restore the ones that were: a memory probe, a
    calibration pass or an exact baseline must not enter the statistics of the probes a run is collecting."""
    active = list(state.probes)
    state.probes[:] = probes
    try:
        yield
    finally:
        state.probes[:] = active


def hooked_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The registered attention function: base backend first, then the probes."""
    base = module._lmr_base
    state: HookState = module._lmr_state
    if not state.probes:
        return base(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if scaling is None:
        # Backends default to 1/sqrt(d) when no scaling is passed; probes must use the same number.
        scaling = query.shape[-1] ** -0.5
    call = AttentionCall(module, module._lmr_layer, query, key, value, attention_mask, scaling, kwargs)
    module._lmr_softcap = kwargs.get("softcap")  # approximations score keys the way this call does
    for probe in state.probes:
        new_query = probe.before(call)
        if new_query is not None:
            call.query = new_query
    output = weights = None
    if state.may_attend and may_skip_backend(module, call):
        for probe in state.probes:
            attend = getattr(probe, "attend", None)
            if attend is not None:
                output = attend(call)
                break
    if output is None:
        output, weights = base(module, call.query, key, value, attention_mask, scaling=scaling, **kwargs)
    for probe in state.probes:
        new_output = probe.after(call, output)
        if new_output is not None:
            output = new_output
    return output, weights


def may_skip_backend(module: nn.Module, call: AttentionCall) -> bool:
    """Whether a probe may compute this call's exact output itself instead of the sdpa backend.

    Only float32 calls of a causal module with no dropout, so that logits stay the backend's (the hook's promise)
    whatever the probe computes the output with. transformers' sdpa backend reads nothing else from the call's keyword arguments (it refuses `softcap`
    and `output_attentions`, so those keep the backend and its error)."""
    kwargs = call.kwargs
    return (
        call.query.dtype == torch.float32
        and kwargs.get("is_causal", getattr(module, "is_causal", True)) is not False
        and not kwargs.get("dropout")
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions")
    )


def cpu_attention_with_lse(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(output (B, Hq, Q, D), softmax log-normaliser (B, Hq, Q)) from the kernel that `sdpa` itself runs on a CPU.

    The analysis needs each query's log-normaliser over all its keys; computing it again costs a pass over every
    score. PyTorch's CPU flash-attention kernel (what `scaled_dot_product_attention` dispatches to there) returns it
    beside the output, which is bit-for-bit sdpa's. None off the CPU or where that private op is missing, and then
    the backend runs and the probe computes the normaliser itself.
    """
    kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if kernel is None or call.query.device.type != "cpu":
        return None
    mask = call.attention_mask
    if mask is not None and mask.dtype == torch.bool:  # as sdpa does: False -> -inf, added to the scores
        mask = torch.zeros(mask.shape, dtype=call.query.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    is_causal = mask is None and call.query.shape[2] > 1
    try:
        output, lse = kernel(call.query, call.key, call.value, 0.0, is_causal, attn_mask=mask, scale=call.scaling)
    except RuntimeError:  # a shape or mask the kernel does not take: the backend decides
        return None
    return output, lse


def _model_eager_function(module: nn.Module) -> Callable:
    """The eager attention that the module's own modeling file defines (soft-capping and all)."""
    modeling = sys.modules[type(module).__module__]
    return modeling.eager_attention_forward


def _is_attention_module(module: nn.Module) -> bool:
    modeling = sys.modules.get(type(module).__module__)
    return (
        type(module).__name__.endswith("Attention")
        and modeling is not None
        and hasattr(modeling, "eager_attention_forward")
        and hasattr(modeling, "ALL_ATTENTION_FUNCTIONS")
    )


def _base_function(base_attn: str, module: nn.Module) -> Callable:
    if base_attn == "eager":
        return _model_eager_function(module)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[base_attn]


def check_base_attn(base_attn: str) -> None:
    """Reject a backend we cannot wrap, or one that cannot run here, with the fix in one line."""
    if base_attn not in BASE_BACKENDS:
        raise UserInputError(f"unknown base_attn={base_attn!r}; use one of {', '.join(BASE_BACKENDS)}")
    if base_attn == "flash_attention_2":
        import importlib.util

        if not torch.cuda.is_available():
            raise UserInputError(
                "base_attn=flash_attention_2 needs a CUDA GPU; on this machine use base_attn=sdpa or base_attn=eager"
            )
        if importlib.util.find_spec("flash_attn") is None:
            raise UserInputError(
                "base_attn=flash_attention_2 needs flash-attn: pip install 'lm-eval-retrieval[flash]', or use base_attn=sdpa"
            )


def register_backend(base_attn: str) -> str:
    """Register `lmr_<base>` with transformers (attention and mask) and return the name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = HOOK_PREFIX + base_attn
    AttentionInterface.register(name, hooked_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_attn])
    return name


def _head_counts(model: nn.Module) -> tuple[int, int]:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads, kv_heads


def install_hook(model: nn.Module, base_attn: str = "sdpa") -> HookState:
    """Route every attention layer of `model` through `hooked_attention` over `base_attn`.

    A model whose attention does not go through transformers' AttentionInterface is an error here, at load time:
    a silent no-op would hand back tables of nothing.
    """
    check_base_attn(base_attn)
    existing = getattr(model, "_lmr_state", None)
    if existing is not None:
        return existing
    modules = [(name, m) for name, m in model.named_modules() if _is_attention_module(m)]
    can_set = getattr(model, "_can_set_attn_implementation", lambda: False)()
    if not modules or not can_set:
        raise UserInputError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface, so "
            "lm-eval-retrieval cannot hook it; use a model class from transformers >= 5 (Llama, Qwen2, Mistral, Phi3, GPT-NeoX, Gemma3 ...)"
        )
    heads, kv_heads = _head_counts(model)
    state = HookState(num_layers=len(modules), num_heads=heads, num_kv_heads=kv_heads, may_attend=base_attn == "sdpa")
    for layer, (name, module) in enumerate(modules):
        module._lmr_layer = layer
        module._lmr_state = state
        module._lmr_base = _base_function(base_attn, module)
        # The seed API: `module._attn` is the exact attention in the `_approx_attn` contract, unbound, so that
        # `module._approx_attn = MethodType(module._attn, module)` turns the "approximation" exact.
        module._attn = exact_attention
        state.module_names.append(name)
    model.set_attn_implementation(register_backend(base_attn))
    model._lmr_state = state
    return state
