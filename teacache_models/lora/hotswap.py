"""Hotswapping: `load_lora_adapter(..., adapter_name=LOADED, hotswap=True)` copies a new LoRA's weights and scales
into the layers of a loaded adapter, as diffusers does with PEFT's `hotswap_adapter_from_state_dict`: no module
or tensor is replaced, so a compiled model need not recompile (`enable_lora_hotswap` pads the first adapter's
ranks for that). Everything is checked before anything is copied, so a refused LoRA changes nothing."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .formats import PEFT_KEY

__all__ = ["hotswap_adapter"]

# The settings a hotswapped adapter keeps from the adapter it replaces (its ranks and alphas are swapped).
_SWAPPABLE = ("use_dora", "lora_bias", "use_rslora", "lora_dropout")


def hotswap_adapter(
    model: nn.Module, config: Any, adapter_name: str, weights: dict[str, torch.Tensor], base_tuner: type
) -> None:
    """Copy `weights` (PEFT layout, no prefix, checked against the model's layers) and `config`'s scales into the
    loaded adapter `adapter_name`. Raises ValueError, changing nothing, for a LoRA adapting modules the adapter
    does not, other settings (`_SWAPPABLE`), a DoRA adapter's modules not all swapped, or a fused adapter."""
    from peft import LoraConfig
    from peft.utils.hotswap import hotswap_adapter_from_state_dict

    if not isinstance(model.peft_config[adapter_name], LoraConfig):
        raise ValueError(f"hotswap: adapter {adapter_name!r} is not a LoRA adapter; PEFT hotswaps LoRA weights only")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, base_tuner) and adapter_name in m.lora_A}
    modules = {PEFT_KEY.fullmatch(k)["module"] for k in weights}
    extra = sorted(modules - set(layers))
    if extra:
        shown = ", ".join(extra[:20]) + (f", ... ({len(extra) - 20} more)" if len(extra) > 20 else "")
        raise ValueError(
            f"hotswap: the LoRA adapts {len(extra)} modules that adapter {adapter_name!r} does not adapt: {shown}; "
            "hotswapping replaces weights only (delete_adapters() it and load the new one)"
        )
    if any(adapter_name in m.merged_adapters for m in layers.values()):
        raise ValueError(f"hotswap: adapter {adapter_name!r} is fused into the weights; unfuse_lora() first")
    current = model.peft_config[adapter_name]
    differing = [
        f"{k}: {getattr(current, k)} -> {getattr(config, k)}"
        for k in _SWAPPABLE
        if getattr(current, k) != getattr(config, k)
    ]
    if current.use_dora and modules != set(layers):
        # PEFT zeroes what the new LoRA lacks, and a zero DoRA magnitude would zero the layer's output.
        differing.append(f"a DoRA adapter must be swapped for one on the same {len(layers)} modules")
    if differing:
        raise ValueError(f"hotswap: the LoRA cannot replace adapter {adapter_name!r}: {'; '.join(differing)}")
    hotswap_adapter_from_state_dict(model, _keyed_by_adapter(weights, adapter_name), adapter_name, config)
    _set_scales(layers, modules, config, adapter_name)
    model.peft_config[adapter_name] = config


def _set_scales(layers: dict[str, nn.Module], modules: set[str], config: Any, adapter_name: str) -> None:
    """Each swapped module's scale from `config`, and the alpha `set_adapters` scales from. (PEFT matches the
    config's per-module patterns against parameter names, which the anchored patterns of a derived config
    miss.)"""
    from peft.utils.other import get_pattern_key

    for name in modules:
        layer = layers[name]
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern, name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern, name), config.lora_alpha)
        scaling = alpha / (math.sqrt(rank) if config.use_rslora else rank)
        padded = layer.r[adapter_name]  # the rank of the layer's tensors: enable_lora_hotswap may have padded it
        layer.lora_alpha[adapter_name] = scaling * (math.sqrt(padded) if config.use_rslora else padded)
        if isinstance(layer.scaling[adapter_name], torch.Tensor):
            layer.scaling[adapter_name].fill_(scaling)  # a tensor after enable_lora_hotswap: keep the object
        else:
            layer.scaling[adapter_name] = scaling


def _keyed_by_adapter(weights: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
    """PEFT-layout keys with the adapter's name inserted, as the layers name their parameters
    (`<module>.lora_A.weight` -> `<module>.lora_A.<name>.weight`)."""
    keyed = {}
    for key, tensor in weights.items():
        match = PEFT_KEY.fullmatch(key)
        part, _, leaf = match["part"].partition(".")
        keyed[f"{match['module']}.{part}.{adapter_name}.{leaf or 'weight'}"] = tensor
    return keyed
