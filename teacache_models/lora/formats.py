"""The LoRA file layouts each family reads, and diffusers' converters that bring them to the PEFT layout.

The layout of a loaded adapter is PEFT's, the one diffusers' `save_lora_weights` writes:
`transformer.<module>.lora_A.weight` (rank, in), `...lora_B.weight` (out, rank), optionally
`...lora_B.bias`, `...lora_magnitude_vector` (DoRA) and `<module>.alpha` (a scalar: the adapter then scales
by alpha / rank, else by 1).
Community trainers write other names (Kohya's `lora_unet_..._lora_down`, XLabs' processors, the original
Wan / HunyuanVideo module names of the distill LoRAs); each family lists the layouts it recognises, in
the order diffusers' `<Family>LoraLoaderMixin.lora_state_dict` tries them, and converts with diffusers'
own functions (`diffusers.loaders.lora_conversion_utils`, imported when a file needs one).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .flux_bfl import BFL_PREFIX, convert_bfl_flux_lora
from .lokr import LOKR_KEY

__all__ = ["PEFT_KEY", "LoraFormat", "formats_for", "is_peft_layout", "to_peft_layout"]

# A key of the PEFT layout: the module's name, then its LoRA part (`lora_magnitude_vector`: DoRA's magnitudes).
PEFT_KEY = re.compile(
    r"(?P<module>.+)\.(?:(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector)|alpha)"
)

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LoraFormat:
    """A file layout: its name, how it is recognised, and what converts it: the name of a diffusers function,
    or one of ours taking the model too (None: refused with `refusal`)."""

    name: str
    detect: Callable[[Mapping[str, torch.Tensor]], bool]
    converter: str | Callable[[nn.Module, StateDict], StateDict] | None
    refusal: str = ""
    # (old, new): a key prefix renamed before the diffusers converter runs, as its pipeline loader does.
    renamed_prefix: tuple[str, str] | None = None

    def convert(self, model: nn.Module, state_dict: StateDict) -> StateDict:
        """The PEFT layout of `state_dict`, whose tensors are left as they were (some of diffusers' converters
        scale their input in place, so they get copies)."""
        if self.converter is None:
            raise ValueError(f"LoRA format {self.name!r} is not supported: {self.refusal}")
        if callable(self.converter):
            return self.converter(model, state_dict)
        module = importlib.import_module("diffusers.loaders.lora_conversion_utils")
        old, new = self.renamed_prefix or ("", "")
        copies = {
            (new + k.removeprefix(old) if old and k.startswith(old) else k): v.clone() for k, v in state_dict.items()
        }
        return getattr(module, self.converter)(copies)


def is_peft_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Keys of PEFT's LoRA layout, or of its LoKr layout (loaded as they are, like LoRA)."""
    return all(PEFT_KEY.fullmatch(key) for key in state_dict) or all(LOKR_KEY.fullmatch(key) for key in state_dict)


def _any_key(test: Callable[[str], bool]) -> Callable[[Mapping[str, torch.Tensor]], bool]:
    return lambda state_dict: any(test(key) for key in state_dict)


def _non_diffusers(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """What diffusers' Qwen-Image and Z-Image loaders send to their converter."""
    return any(
        key.endswith(".alpha") or key.startswith(("lora_unet_", "diffusion_model.")) or "default." in key
        for key in state_dict
    )


_LEGACY = LoraFormat(
    "diffusers (attention processors: lora.down / lora.up)",
    _any_key(lambda k: ".lora.down." in k or ".lora.up." in k or "lora_linear_layer" in k),
    None,
)
# Kohya / LyCORIS name modules by their flattened original names under these prefixes.
_KOHYA_PREFIXES = ("lora_unet_", "lycoris_", "lora_te")
_LOKR = LoraFormat(
    "LyCORIS / Kohya LoKr (lora_unet_..._lokr_w1)",
    _any_key(lambda k: ".lokr_" in k and k.startswith(_KOHYA_PREFIXES)),
    None,
    "LoKr adapters are loaded in PEFT's layout only (<module>.lokr_w1, as diffusers' save_lora_adapter writes "
    "it); this file's keys are not module names of the model",
)
_LOHA = LoraFormat(
    "LyCORIS LoHa (hada_w1 / hada_w2)",
    _any_key(lambda k: ".hada_" in k),
    None,
    "LoHa adapters (Hadamard products) are not low-rank LoRAs; only LoRA and DoRA adapters are loaded",
)
_DORA = LoraFormat(
    "Kohya / LyCORIS DoRA (dora_scale)",
    _any_key(lambda k: "dora_scale" in k),
    None,
    "these DoRA magnitudes are not converted (diffusers drops them with a warning, which changes the output); "
    "DoRA in the PEFT layout (lora_magnitude_vector, as save_lora_adapter writes it) is loaded",
)

_QWEN_IMAGE = (
    LoraFormat(
        "Qwen-Image community (alpha / lora_unet_ / diffusion_model. / default.)",
        _non_diffusers,
        "_convert_non_diffusers_qwen_lora_to_diffusers",
    ),
)

_FAMILY_FORMATS: dict[str, tuple[LoraFormat, ...]] = {
    "FluxTransformer2DModel": (
        LoraFormat(
            "Kohya / ComfyUI (lora_down / lora_up)",
            _any_key(lambda k: ".lora_down.weight" in k),
            "_convert_kohya_flux_lora_to_diffusers",
        ),
        LoraFormat("XLabs (processor)", _any_key(lambda k: "processor" in k), "_convert_xlabs_flux_lora_to_diffusers"),
        LoraFormat(
            "BFL Control LoRA (query_norm.scale)",
            _any_key(lambda k: "query_norm.scale" in k),
            None,
            "Control LoRAs widen x_embedder and replace norm layers: a Flux Control model, not a LoRA on FLUX.1",
        ),
        LoraFormat(
            "BFL / fal (base_model.model.)",
            _any_key(lambda k: k.startswith(BFL_PREFIX)),
            convert_bfl_flux_lora,
        ),
    ),
    # As diffusers' Flux2LoraLoaderMixin tries them.
    "Flux2Transformer2DModel": (
        LoraFormat(
            "Kohya / sd-scripts (lora_down / lora_up)",
            _any_key(lambda k: ".lora_down.weight" in k),
            "_convert_kohya_flux2_lora_to_diffusers",
        ),
        LoraFormat(
            "BFL / ai-toolkit LoKr (diffusion_model. / base_model.model. with lokr_)",
            _any_key(lambda k: ".lokr_" in k and k.startswith(("diffusion_model.", BFL_PREFIX))),
            None,
            "these LoKr files adapt fused QKV projections, which diffusers fuses the model's projections for; the "
            "native FLUX.2 keeps Q, K and V apart",
        ),
        LoraFormat(
            "BFL / PEFT names (base_model.model.)",
            _any_key(lambda k: k.startswith(BFL_PREFIX)),
            "_convert_non_diffusers_flux2_lora_to_diffusers",
            renamed_prefix=(BFL_PREFIX, "diffusion_model."),
        ),
        LoraFormat(
            "ai-toolkit / BFL names (diffusion_model.)",
            _any_key(lambda k: k.startswith("diffusion_model.")),
            "_convert_non_diffusers_flux2_lora_to_diffusers",
        ),
    ),
    "WanTransformer3DModel": (
        LoraFormat(
            "Wan original (diffusion_model.)",
            _any_key(lambda k: k.startswith("diffusion_model.")),
            "_convert_non_diffusers_wan_lora_to_diffusers",
        ),
        LoraFormat(
            "musubi-tuner (lora_unet_)",
            _any_key(lambda k: k.startswith("lora_unet_")),
            "_convert_musubi_wan_lora_to_diffusers",
        ),
    ),
    "HunyuanVideoTransformer3DModel": (
        LoraFormat(
            "HunyuanVideo original (img_attn_qkv)",
            _any_key(lambda k: "img_attn_qkv" in k),
            "_convert_hunyuan_video_lora_to_diffusers",
        ),
    ),
    "QwenImageTransformer2DModel": _QWEN_IMAGE,
    # diffusers' QwenImage21Pipeline loads LoRAs with Qwen-Image's loader.
    "QwenImage21Transformer2DModel": _QWEN_IMAGE,
    "ZImageTransformer2DModel": (
        LoraFormat(
            "Z-Image community (alpha / lora_unet_ / diffusion_model. / default.)",
            _non_diffusers,
            "_convert_non_diffusers_z_image_lora_to_diffusers",
        ),
    ),
}

PEFT_FORMAT_NAME = "diffusers / PEFT (lora_A / lora_B)"


def formats_for(model: nn.Module) -> tuple[LoraFormat, ...]:
    """The layouts tried for `model`'s class, in order (the PEFT layout is tried last, as in diffusers)."""
    return (_DORA, _LOKR, _LOHA, *_FAMILY_FORMATS.get(type(model).__name__, ()), _LEGACY)


def to_peft_layout(model: nn.Module, state_dict: StateDict) -> tuple[StateDict, str]:
    """`state_dict` in the PEFT layout, and the name of the layout it came in.

    Raises ValueError naming every layout tried when none recognises the keys, or when a converter fails
    (the file then looks like that layout but does not fit it).
    """
    formats = formats_for(model)
    for candidate in formats:
        if not candidate.detect(state_dict):
            continue
        if candidate is _LEGACY:
            from diffusers.utils import convert_unet_state_dict_to_peft

            converted = convert_unet_state_dict_to_peft(dict(state_dict))
        elif candidate.converter is None:
            candidate.convert(model, state_dict)  # raises: the layout is refused, with the reason
        else:
            try:
                converted = candidate.convert(model, state_dict)
            except (KeyError, AssertionError, IndexError, RuntimeError, ValueError) as error:
                raise ValueError(
                    f"the LoRA looks like the {candidate.name} layout, but its converter failed "
                    f"({type(error).__name__}: {error}); is it for {type(model).__name__}?"
                ) from None
        if not converted:
            raise ValueError(
                f"the LoRA looks like the {candidate.name} layout, but none of its keys (such as "
                f"{_shown(sorted(state_dict), 5)}) name a module of {type(model).__name__} in that layout"
            )
        if not is_peft_layout(converted):
            left = sorted(k for k in converted if not PEFT_KEY.fullmatch(k))
            raise ValueError(
                f"the LoRA looks like the {candidate.name} layout, but converting it left keys that are not "
                f"LoRA weights: {_shown(left)}"
            )
        return converted, candidate.name
    if is_peft_layout(state_dict):
        return dict(state_dict), PEFT_FORMAT_NAME
    tried = [PEFT_FORMAT_NAME, *(f.name for f in formats)]
    unknown = sorted(k for k in state_dict if not PEFT_KEY.fullmatch(k))
    raise ValueError(
        f"unknown LoRA format for {type(model).__name__}: keys such as {_shown(unknown, 5)} match none of the "
        f"layouts tried: {'; '.join(tried)}"
    )


def _shown(keys: list[str], limit: int = 20) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
