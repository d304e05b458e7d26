"""Numeric guards for half-precision activations."""

from __future__ import annotations

import torch

__all__ = ["clip_fp16"]

_FP16_MAX = 65504.0


def clip_fp16(x: torch.Tensor) -> torch.Tensor:
    """Clip float16 activations to the float16 range; other dtypes pass through.

    Activations of the released Flux and Qwen-Image weights exceed the float16 range; clipping keeps
    them finite.
    """
    return x.clip(-_FP16_MAX, _FP16_MAX) if x.dtype == torch.float16 else x
