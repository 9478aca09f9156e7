"""`quantize=4bit|8bit`: bitsandbytes quantisation, the original detector's `--quantize`.

bitsandbytes >= 0.50 runs both on CUDA and (slower) on CPU, so the only things refused, before any weight is read,
are a missing or broken bitsandbytes and a GGUF model (whose weights are quantised already).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UserInputError

MODES = ("4bit", "8bit")


def quantization_config(mode: Any, gguf_file: str | None, dtype: Any = None) -> Any:
    """A `BitsAndBytesConfig` for `mode`, or a one-line error naming what is missing."""
    mode = str(mode).strip().lower()
    if mode not in MODES:
        raise UserInputError(f"unknown quantize={mode!r}; use quantize=4bit or quantize=8bit")
    if gguf_file:
        raise UserInputError(
            f"quantize={mode} does not apply to a GGUF model (its weights are already quantised); drop quantize="
        )
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # missing, or built for a platform it cannot run on
        raise UserInputError(
            f"quantize={mode} needs a working bitsandbytes ({type(error).__name__}: {str(error)[:80]}): "
            "pip install 'lm-eval-retrieval[quantize]', or drop quantize="
        ) from None
    from transformers import BitsAndBytesConfig

    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = getattr(torch, str(dtype)) if isinstance(dtype, str) and hasattr(torch, str(dtype)) else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute, bnb_4bit_quant_type="nf4")
