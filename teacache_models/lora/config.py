"""What a LoRA file's tensors say, checked before PEFT sees them: the adapter's `LoraConfig` (from the stored
config, else from the ranks and alphas of its tensors), each module's shapes against the layer it adapts, and
the zero biases PEFT expects where an adapter has some."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .formats import PEFT_KEY

__all__: list[str] = []


def _without_prefix_keys(metadata: Mapping[str, Any], prefix: str | None) -> dict[str, Any]:
    """The adapter config stored in a file: a pipeline's file stores it under `transformer.<field>`."""
    if prefix and any(k.startswith(f"{prefix}.") for k in metadata):
        return {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")}
    return dict(metadata)


def _shape_problems(name: str, base: nn.Module, parts: dict[str, torch.Tensor]) -> list[str]:
    down, up, bias = parts.get("lora_A.weight"), parts.get("lora_B.weight"), parts.get("lora_B.bias")
    magnitude = parts.get("lora_magnitude_vector")
    if down is None or up is None:
        return [f"{name} has {'lora_B' if down is None else 'lora_A'} without its pair"]
    out_features, in_features = base.weight.shape[0], base.weight.shape[1]
    kernel = tuple(base.weight.shape[2:])
    problems = []
    if down.ndim != base.weight.ndim or down.shape[1] != in_features or tuple(down.shape[2:]) != kernel:
        needed = ", ".join(map(str, ("rank", in_features, *kernel)))
        problems.append(f"{name}.lora_A has shape {tuple(down.shape)}, the layer needs ({needed})")
    if up.ndim != base.weight.ndim or up.shape[0] != out_features:
        problems.append(f"{name}.lora_B has shape {tuple(up.shape)}, the layer needs ({out_features}, rank, ...)")
    elif up.shape[1] != down.shape[0]:
        problems.append(f"{name}: lora_A has rank {down.shape[0]} but lora_B rank {up.shape[1]}")
    for part, tensor in (("lora_B.bias", bias), ("lora_magnitude_vector", magnitude)):
        if tensor is not None and tuple(tensor.shape) != (out_features,):
            problems.append(f"{name}.{part} has shape {tuple(tensor.shape)}, the layer needs ({out_features},)")
    if not all(t.is_floating_point() for t in parts.values()):
        problems.append(f"{name} has non-floating-point LoRA tensors")
    return problems


def _fill_missing_biases(weights: dict[str, torch.Tensor]) -> None:
    """PEFT gives every layer of an adapter a `lora_B` bias when any has one (the distill LoRAs' `diff_b`): a
    layer whose file has none gets zeros, the delta it means (diffusers leaves PEFT's zero initialisation)."""
    if not any(k.endswith("lora_B.bias") for k in weights):
        return
    for key in [k for k in weights if k.endswith("lora_B.weight")]:
        bias = key.removesuffix("weight") + "bias"
        if bias not in weights:
            out_features = weights[key].shape[0]
            weights[bias] = torch.zeros(out_features, dtype=weights[key].dtype, device=weights[key].device)


def _listed(names: list[str], limit: int = 20) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _lora_config(weights: dict[str, torch.Tensor], alphas: dict[str, float], metadata: Mapping[str, Any] | None):
    """The `LoraConfig` of an adapter: `metadata` where given, else its rank per module (from `lora_B`) and
    alpha per module (`alphas`, else equal to the rank: a scale of 1, the diffusers / PEFT convention)."""
    from peft import LoraConfig

    ranks = {PEFT_KEY.fullmatch(k)["module"]: v.shape[1] for k, v in weights.items() if k.endswith("lora_B.weight")}
    dora = {PEFT_KEY.fullmatch(k)["module"] for k in weights if k.endswith("lora_magnitude_vector")}
    if dora and dora != set(ranks):
        raise ValueError(
            f"DoRA magnitudes (lora_magnitude_vector) are missing for {_listed(sorted(set(ranks) - dora))}"
        )
    if metadata is not None:
        try:
            config = LoraConfig(**dict(metadata))
        except TypeError as error:
            raise TypeError(f"`LoraConfig` class could not be instantiated from the LoRA's config: {error}") from None
        if bool(config.use_dora) != bool(dora):
            raise ValueError(
                f"the LoRA's config says use_dora={config.use_dora}, but its tensors "
                f"{'hold' if dora else 'lack'} DoRA magnitudes (lora_magnitude_vector)"
            )
        from peft.utils.other import get_pattern_key

        stated = {m: config.rank_pattern.get(get_pattern_key(config.rank_pattern, m), config.r) for m in ranks}
        wrong = [f"{m} (config {stated[m]}, tensors {r})" for m, r in ranks.items() if stated[m] != r]
        if wrong:
            raise ValueError(f"the LoRA's stored config states other ranks than its tensors: {_listed(wrong)}")
        return config
    alpha_of = {m: alphas.get(m, float(r)) for m, r in ranks.items()}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alpha_of.values()), key=list(alpha_of.values()).count)
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        # Anchored patterns: a module's name must not also match another module ending with it.
        rank_pattern={f"^{re.escape(m)}$": r for m, r in ranks.items() if r != rank},
        alpha_pattern={f"^{re.escape(m)}$": a for m, a in alpha_of.items() if a != alpha},
        # A pattern matching the adapted names exactly: a list would also match every module ending with one.
        target_modules="|".join(f"(?:{re.escape(m)})" for m in sorted(ranks)),
        lora_bias=any(k.endswith("lora_B.bias") for k in weights),
        use_dora=bool(dora),
    )
