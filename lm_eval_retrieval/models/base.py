"""What both plugin models share: alias resolution, model-arg checking, the attention hook, where results go."""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import re
import struct
import sys
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM

from ..attention.hook import check_base_attn, install_hook
from ..attention.probes import HeadMask
from ..errors import UserInputError
from ..report.files import check_writable
from .aliases import ResolvedModel, converted, is_local_model, resolve_model
from .gguf_cache import loads_cleanly
from .masking import by_layer, select_heads
from .quantize import quantization_config
from .resume import take_over_from_caching_lm

log = logging.getLogger(__name__)
MASK_ARGS = ("mask_heads", "mask_topk", "mask_random", "head_scores", "seed", "mask_mode")
HEAD_KEY = re.compile(r"^\d+-\d+$")

# `from_pretrained` arguments that HFLM forwards through **kwargs and that make sense here.
FROM_PRETRAINED_ARGS = {
    "low_cpu_mem_usage", "device_map", "quantization_config", "cache_dir", "local_files_only", "token",
    "torch_dtype", "use_safetensors", "rope_scaling", "offload_state_dict",
}


def output_dir_from_argv(argv: list[str] | None = None) -> str | None:
    """The `--output_path` of the running `lm_eval` command: lm-eval does not hand it to the model."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--output_path", "-o")
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    path = known.output_path
    if path and path.endswith(".json"):
        path = os.path.dirname(path) or "."
    return path


def load_error(error: BaseException, pretrained: str, resolved: ResolvedModel) -> BaseException:
    """`from_pretrained`'s failure as one line: a hub id that is not there or cannot be reached, or a bad file."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and link not in chain and len(chain) < 20:
        chain.append(link)
        link = link.__cause__ or link.__context__

    def first(*types: type) -> BaseException | None:
        return next((link for link in chain if isinstance(link, types)), None)

    def first_line(link: BaseException) -> str:
        return (str(link).strip().splitlines() or [type(link).__name__])[0][:200]

    network = next(
        (link for link in chain if type(link).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3")
         and not hasattr(link, "response")), None,
    ) or first(OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError)
    if not is_local_model(pretrained):
        if first(GatedRepoError):
            return UserInputError(
                f"model {pretrained!r} on the Hugging Face hub is gated: accept its terms on its page and log in with "
                "`hf auth login` (or set HF_TOKEN)"
            )
        if first(RepositoryNotFoundError):
            return UserInputError(
                f"model {pretrained!r} was not found on the Hugging Face hub; check the spelling (org/name), or log in "
                "with `hf auth login` if it is private"
            )
        if first(RevisionNotFoundError):
            return UserInputError(f"model {pretrained!r} has no such revision on the Hugging Face hub; check revision=")
        if network is not None:
            return UserInputError(
                f"cannot download model {pretrained!r} from the Hugging Face hub ({type(network).__name__}: "
                f"{first_line(network)}); run `hf download {pretrained}` where there is a network (older huggingface_hub: "
                "`huggingface-cli download`), or give a local path"
            )
    if not isinstance(error, (OSError, ValueError, EOFError, KeyError, struct.error)):
        return error  # not a load failure the user can fix: keep the traceback
    where = os.path.join(resolved.pretrained, resolved.gguf_file or "")
    return UserInputError(
        f"cannot load the model at {where!r} ({type(error).__name__}: {first_line(error)}); check that the file is a "
        "complete, uncorrupted model (re-copy it)"
    )


def as_bool(value: Any) -> bool:
    """model_args arrive as strings, bools or ints depending on who parsed them."""
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no", ""):
            return False
        raise UserInputError(f"expected true or false, got {value!r}")
    return bool(value)


class HookedHFLM(HFLM):
    """An HFLM whose attention runs through the plugin's hook; subclasses add the probes."""

    OWN_ARGS: tuple[str, ...] = ()

    def __init__(
        self,
        pretrained: str = "smollm2-135m",
        base_attn: str = "sdpa",
        output_path: str | None = None,
        gguf_file: str | None = None,
        device: str | None = None,
        quantize: str | None = None,
        **kwargs: Any,
    ) -> None:
        self._mask_args = self._take_mask_args(kwargs)  # the head selection, checked in _get_config and applied below
        mask_mode = self._mask_args.pop("mask_mode", "uniform")
        self._check_model_args(kwargs)
        if mask_mode not in HeadMask.MODES:
            raise UserInputError(f"unknown mask_mode={mask_mode!r}; use uniform or zero")
        check_base_attn(base_attn)
        self.output_dir = output_path or output_dir_from_argv() or "."
        check_writable(self.output_dir)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            os.environ.setdefault("ACCELERATE_USE_CPU", "true")  # launched N-way without GPUs: gloo, one CPU each
        resolved = resolve_model(str(pretrained), gguf_file)
        self._quantization = None
        if quantize not in (None, "", "none", "None"):
            self._quantization = quantization_config(
                quantize, resolved.gguf_file or resolved.source_gguf, kwargs.get("dtype")
            )
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        for attempt in (1, 2):
            try:
                super().__init__(
                    pretrained=resolved.pretrained,
                    gguf_file=resolved.gguf_file,
                    device=device,
                    attn_implementation=base_attn,
                    **kwargs,
                )
                break
            except UserInputError:
                raise
            except Exception as error:  # unreadable weights or config, or a hub id that cannot be downloaded
                if attempt == 1 and resolved.source_gguf and not loads_cleanly(resolved.pretrained):
                    # the cached conversion is broken: rebuild it from the GGUF, once
                    log.warning("the cached copy of %s did not load (%s); converting it again", resolved.name, error)
                    resolved = converted(resolved.source_gguf, resolved.name, rebuild=True)
                    continue
                wrapped = load_error(error, str(pretrained), resolved)
                if wrapped is error:
                    raise
                raise wrapped from error
        self.model_name = resolved.name
        self.pretrained_arg = str(pretrained)
        self.base_attn = base_attn
        self._enable_cpu_data_parallel()
        self.hook_state = install_hook(self.model, base_attn)
        shape = (self.hook_state.num_layers, self.hook_state.num_heads)
        self.masked_heads: list[tuple[int, int]] = []
        self.set_head_mask(select_heads(shape, **self._mask_args), mask_mode)

    def _get_config(self, pretrained: str, **kwargs: Any) -> None:
        """HFLM hands `from_pretrained` the quantisation config it finds on the model config: put ours there."""
        super()._get_config(pretrained, **kwargs)
        if self._quantization is not None:
            self._config.quantization_config = self._quantization
        # The masked heads, checked against the config's shape before any weight is read (a typo costs seconds).
        text = self._config.get_text_config() if hasattr(self._config, "get_text_config") else self._config
        layers, heads = getattr(text, "num_hidden_layers", None), getattr(text, "num_attention_heads", None)
        if isinstance(layers, int) and isinstance(heads, int):
            select_heads((layers, heads), **self._mask_args)

    def _enable_cpu_data_parallel(self) -> None:
        """`accelerate launch --num_processes N` on CPU: HFLM only shards requests when it counts several GPUs, so
        without this every process would run every document as rank 0 and each would write the results."""
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1 and self._world_size == 1:
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes

    def set_cache_hook(self, cache_hook: Any) -> None:
        """lm-eval's `--use_cache`: take the request methods back from its `CachingLM` (see models/resume.py)."""
        super().set_cache_hook(cache_hook)
        database = getattr(cache_hook, "dbdict", None)
        if database is not None and take_over_from_caching_lm(self, caller_depth=2):
            self.use_result_cache(database.filename)

    def use_result_cache(self, cache_file: str) -> None:
        """Subclasses keep what they need to skip finished requests in `cache_file`; the default recomputes."""
        log.info("%s recomputes cached requests: its statistics are not in lm-eval's response cache", type(self).__name__)

    def gather_to_rank0(self, value: Any) -> list[Any] | None:
        """Every process's `value`, in rank order, on rank 0 (None elsewhere); all ranks must call it together."""
        if self.world_size <= 1:
            return [value]
        return self.gather_object(value, dst=0)

    @staticmethod
    def _take_mask_args(kwargs: dict[str, Any]) -> dict[str, Any]:
        """Pull the masking args out of kwargs.

        Heads are written `mask_heads=16-19;11-15`: lm-eval splits model_args at commas (its `lm_eval run` parser
        refuses `mask_heads=16-19,11-15` outright). The comma form still works where a parser lets it through
        (`simple_parse_args_string`, as in `simple_evaluate(model_args=...)`): it arrives as keys `11-15` with no
        value, put back here.
        """
        taken = {name: kwargs.pop(name) for name in MASK_ARGS if name in kwargs}
        extra = [key for key, value in list(kwargs.items()) if HEAD_KEY.match(str(key)) and value in ("", None)]
        if extra:
            if "mask_heads" not in taken:
                raise UserInputError(f"model_args key(s) {', '.join(extra)} look like heads: write mask_heads={';'.join(extra)}")
            taken["mask_heads"] = ";".join([str(taken["mask_heads"]), *extra])
            for key in extra:
                kwargs.pop(key)
        return taken

    def set_head_mask(self, heads: list[tuple[int, int]], mode: str = "uniform") -> None:
        """Mask `heads` (layer, head) from now on, replacing any earlier mask; [] unmasks every head."""
        probes = self.hook_state.probes
        probes[:] = [p for p in probes if not isinstance(p, HeadMask)]
        if heads:
            probes.insert(0, HeadMask(by_layer(heads), mode))
        self.masked_heads = sorted(heads)
        self.mask_mode = mode

    def _check_model_args(self, kwargs: dict[str, Any]) -> None:
        known = set(inspect.signature(HFLM.__init__).parameters) | FROM_PRETRAINED_ARGS
        unknown = sorted(k for k in kwargs if k not in known)
        if "attn_implementation" in unknown:
            raise UserInputError("use base_attn=sdpa|eager|flash_attention_2 instead of attn_implementation")
        if unknown:
            ours = ["pretrained", "base_attn", "output_path", "quantize", *self.OWN_ARGS, *MASK_ARGS]
            raise UserInputError(
                f"unknown model_args key(s) {', '.join(map(repr, unknown))}; this model takes {', '.join(ours)} "
                "plus lm-eval's hf arguments (dtype, batch_size, max_length, ...)"
            )

    def get_model_info(self) -> dict:
        """Parameters and dtype, without HFLM's hub lookup of a commit hash (everything here is local)."""
        info = {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype),
        }
        if self.masked_heads:
            info["masked_heads"] = {"mode": self.mask_mode, "heads": [f"{l}-{h}" for l, h in self.masked_heads]}
        return info
