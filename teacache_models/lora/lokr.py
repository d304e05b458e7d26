"""LoKr adapters (LyCORIS' Kronecker-product adapters) in PEFT's layout, loaded through PEFT as diffusers does.

A LoKr adapter adds to a linear layer's weight (out, in) the Kronecker product of two factors, w1 (a, b) and
w2 (c, d) with a * c = out and b * d = in; either factor may be stored as a low-rank product (`lokr_w1_a` @
`lokr_w1_b`). The file's keys are `<module>.lokr_w1` or `.lokr_w1_a` / `.lokr_w1_b`, the same for w2, as
PEFT's `get_peft_model_state_dict` and diffusers' `save_lora_adapter` write them. The adapter's `LoKrConfig`
is the one stored in the file, else derived from the factors' shapes by diffusers' `_create_lokr_config`
(the same config diffusers' loader builds, so both predict the same).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["LOKR_KEY", "is_lokr", "lokr_adapter"]

LOKR_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lokr_w[12](?:_[ab])?)")


def is_lokr(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(".lokr_" in key for key in state_dict)


def lokr_adapter(
    model: nn.Module, state_dict: dict[str, torch.Tensor], metadata: Mapping[str, Any] | None, source: str
) -> tuple[Any, dict[str, torch.Tensor]]:
    """The `LoKrConfig` and the tensors (in each layer's dtype, on its device) of a LoKr adapter for `model`.
    Raises ValueError naming every key or module that does not fit (nothing is loaded), TypeError for a
    stored config PEFT cannot read."""
    from diffusers.utils.peft_utils import _create_lokr_config

    modules = dict(model.named_modules())
    factors: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, tensor in state_dict.items():
        match = LOKR_KEY.fullmatch(key)
        if match is None:
            problems.append(f"{key} (a LoKr file holds lokr_w1 / lokr_w2, or their _a / _b factors, only)")
        else:
            factors.setdefault(match["module"], {})[match["part"]] = tensor
    for name, found in factors.items():
        problems.extend(_factor_problems(name, _base(modules.get(name)), found))
    if problems:
        raise ValueError(
            f"{source} (LoKr) does not fit {type(model).__name__}; nothing was loaded: {'; '.join(problems[:20])}"
        )
    try:
        config = _create_lokr_config(state_dict, dict(metadata) if metadata is not None else None)
    except TypeError as error:
        raise TypeError(
            f"`LoKrConfig` class could not be instantiated from the LoRA's config: {error.__cause__}"
        ) from None
    weights = {}
    for key, tensor in state_dict.items():
        weight = _base(modules[LOKR_KEY.fullmatch(key)["module"]]).weight
        weights[key] = tensor.to(weight.device, weight.dtype)
    return config, weights


def _base(module: nn.Module | None) -> nn.Module | None:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _factor_problems(name: str, base: nn.Module | None, found: dict[str, torch.Tensor]) -> list[str]:
    """Why the factors of one module do not fit its layer (none: they do)."""
    if base is None:
        return [f"{name} (no such module)"]
    if not isinstance(base, nn.Linear):
        return [f"{name} ({type(base).__name__}: LoKr adapters are loaded on linear layers only)"]
    shapes = []
    for factor in ("lokr_w1", "lokr_w2"):
        whole, down, up = found.get(factor), found.get(f"{factor}_a"), found.get(f"{factor}_b")
        if whole is not None and whole.ndim == 2 and down is None and up is None:
            shapes.append(tuple(whole.shape))
        elif whole is None and down is not None and up is not None and down.ndim == up.ndim == 2:
            if down.shape[1] != up.shape[0]:
                return [f"{name}.{factor}_a {tuple(down.shape)} and _b {tuple(up.shape)} do not multiply"]
            shapes.append((down.shape[0], up.shape[1]))
        else:
            return [f"{name} needs {factor} as one matrix or as _a and _b, got {sorted(found)}"]
    (a, b), (c, d) = shapes
    if (a * c, b * d) != (base.out_features, base.in_features):
        return [
            f"{name}: the factors {shapes[0]} and {shapes[1]} give a ({a * c}, {b * d}) weight, the layer has "
            f"({base.out_features}, {base.in_features})"
        ]
    return []
