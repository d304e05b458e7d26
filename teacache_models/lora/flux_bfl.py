"""FLUX.1 LoRAs in BFL's module names (as fal's trainer writes them): `base_model.model.<BFL
module>.lora_A.weight`, adapting the fused layers of BFL's original model. Converted for the model at hand.

diffusers' converter for this layout (`_convert_fal_kontext_lora_to_diffusers`) hard-codes FLUX.1's width
(3072) and depth (19 + 38 blocks) and needs every block's modules present. Here the rename table of FLUX.1's
original checkpoints (`weights.conversion.FLUX_ORIGINAL`, which reads the split of a fused layer off the
model's config) places each module, so any size works and a file may adapt any subset of the modules; on a
full-size FLUX.1 the result equals diffusers' (`tests/test_lora.py` checks both).

A fused layer's `lora_A` (rank, in) is shared by its parts; its `lora_B` (out, rank) and `lora_B.bias` are
cut into the parts' rows, in order, as the layer's weight is (and the final modulation's halves swap).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["BFL_PREFIX", "convert_bfl_flux_lora"]

BFL_PREFIX = "base_model.model."
_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|alpha)")
_ROW_PARTS = ("lora_B.weight", "lora_B.bias")  # cut into the parts' rows; the others are shared


def convert_bfl_flux_lora(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` (BFL names under `base_model.model.`) in the PEFT layout of `model`'s modules, under
    `transformer.`. Raises ValueError naming the keys it cannot place (no LoRA key, a module FLUX.1 does not
    have, a module without its `lora_B`, rows that do not split by `model`'s width); a module `model` lacks (a
    LoRA for a deeper FLUX) is left to the loader's check, which names every one."""
    from ..weights.conversion import FLUX_ORIGINAL

    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        match = _KEY.fullmatch(key.removeprefix(BFL_PREFIX)) if key.startswith(BFL_PREFIX) else None
        if match is None:
            unknown.append(key)
        else:
            parts.setdefault(match["module"], {})[match["part"]] = tensor
    unpaired = [f"{BFL_PREFIX}{m}" for m, found in parts.items() if "lora_B.weight" not in found]
    if unknown or unpaired:
        raise ValueError(
            f"not LoRA weights in BFL's layout: {', '.join(sorted(unknown)[:10])}"
            if unknown
            else f"modules with lora_A but no lora_B: {', '.join(sorted(unpaired)[:10])}"
        )
    # The table maps the fused layer's weight: a LoRA's lora_B has the weight's rows.
    fused = {f"{m}.weight": tuple(found["lora_B.weight"].shape) for m, found in parts.items()}
    converted = {}
    for mapping in FLUX_ORIGINAL.map_keys(fused, model.config):
        target = mapping.target.removesuffix(".weight")
        for part, tensor in parts[mapping.source.removesuffix(".weight")].items():
            # A copy either way: the parts' parameters must not share one tensor's storage.
            piece = mapping.apply(tensor) if part in _ROW_PARTS else tensor
            converted[f"transformer.{target}.{part}"] = piece.clone()
    return converted
