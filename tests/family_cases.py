"""One entry per model family for the contract suite (`test_contract.py`).

A family joins the contract by one `FamilyCase` in `CASES`: where its tests build a model next to
diffusers' (its test module's `CONFIGS`, `build_pair`, `bad_inputs` and `BAD_ARCHITECTURE`), how one
call on a fixed flow path looks, and each TeaCache indicator it offers recomputed by hand from the
model's own submodules.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch


@dataclass(frozen=True)
class FamilyCase:
    """How the contract drives one family.

    Attributes:
        family: the key of `teacache_models.families.FAMILIES`.
        module: the family's test module, with `CONFIGS` (name -> tiny config, the first the default),
            `TINY` (the smallest config), `build_pair(config, seed)` (ours, diffusers' with the same random
            weights), `bad_inputs()` (config, good call, {case: (change, error, match)}) and
            `BAD_ARCHITECTURE` ([(constructor change to `TINY`, match)]).
        path: `path(config, seed)` -> `call(sigma)`, the keyword arguments of one call at noise level
            `sigma` on a fixed flow path (latents between data and noise, the timestep of `sigma`).
        indicators: {name: `indicator(model, call)`}, every indicator the model offers, in its order (the first is
            its default): the indicator of that call, by hand.
        output: the prediction tensor of a `return_dict=False` result (Z-Image: one per sample, joined).
    """

    family: str
    module: str
    path: Callable[[dict, int], Callable[[float], dict]]
    indicators: dict[str, Callable[[Any, dict], torch.Tensor]]
    output: Callable[[tuple], torch.Tensor] = lambda result: result[0]

    @property
    def tests(self) -> ModuleType:
        return importlib.import_module(f"tests.{self.module}")


def _flow(latents: torch.Tensor, seed: int) -> Callable[[float], torch.Tensor]:
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + 50))
    return lambda sigma: (1 - sigma) * latents + sigma * noise


def _tensor_path(inputs: dict, key: str, seed: int, timestep: Callable[[float], torch.Tensor]) -> Callable:
    latents = _flow(inputs[key], seed)
    return lambda sigma: {**inputs, key: latents(sigma), "timestep": timestep(sigma)}


# ---- the families ---------------------------------------------------------------------------------


def _flux_path(config: dict, seed: int) -> Callable[[float], dict]:
    from tests.test_flux import make_inputs

    return _tensor_path(make_inputs(config, 1, 4, 4, 5, seed), "hidden_states", seed, lambda s: torch.tensor([s]))


def _flux_indicator(model: Any, call: dict) -> torch.Tensor:
    hidden = model.x_embedder(call["hidden_states"])
    guidance = call.get("guidance")
    temb = model.time_text_embed(
        call["timestep"] * 1000, None if guidance is None else guidance * 1000, call["pooled_projections"]
    )
    return model.transformer_blocks[0].norm1(hidden, temb)[0]


def _flux2_path(config: dict, seed: int) -> Callable[[float], dict]:
    from tests.test_flux2 import make_inputs

    # The noisy image and one reference image; timestep and guidance batch of one, as the pipelines pass them.
    inputs = make_inputs(config, 1, 3, 4, 5, refs=((2, 2),), seed=seed)
    return _tensor_path(inputs, "hidden_states", seed, lambda s: torch.tensor([s]))


def _flux2_indicator(model: Any, call: dict) -> torch.Tensor:
    hidden = model.x_embedder(call["hidden_states"])
    guidance = call.get("guidance")
    temb = model.time_guidance_embed(call["timestep"] * 1000, None if guidance is None else guidance * 1000)
    shift, scale = model.double_stream_modulation_img(temb).chunk(6, dim=-1)[:2]  # (B, D) each
    return (1 + scale[:, None]) * model.transformer_blocks[0].norm1(hidden) + shift[:, None]


def _wan_path(config: dict, seed: int) -> Callable[[float], dict]:
    from tests.test_wan import make_inputs

    inputs = make_inputs(config, 1, (2, 2, 2), seed=seed)
    return _tensor_path(inputs, "hidden_states", seed, lambda s: torch.tensor([s * 1000]))


def _wan_timestep(model: Any, call: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """temb (B, D) and the 6-way projection (B, 6, D) of the call's per-sample timestep."""
    temb, proj = model.condition_embedder.embed_timestep(call["timestep"], call["encoder_hidden_states"].dtype)
    return temb, proj.unflatten(-1, (6, -1))


def _wan_modulated_input(model: Any, call: dict) -> torch.Tensor:
    hidden = model.patch_embedding(call["hidden_states"]).flatten(2).transpose(1, 2)  # (B, L, D)
    block = model.blocks[0]
    shift, scale = (block.scale_shift_table + _wan_timestep(model, call)[1].float())[:, :2].unbind(1)  # (B, D)
    return (block.norm1(hidden.float()) * (1 + scale[:, None]) + shift[:, None]).type_as(hidden)


# The timestep indicators, one per sample, as a length-1 token axis.
_WAN_INDICATORS = {
    "temb": lambda model, call: _wan_timestep(model, call)[0].unsqueeze(1),
    "timestep_proj": lambda model, call: _wan_timestep(model, call)[1].unsqueeze(1),
    "modulated_input": _wan_modulated_input,
}


def _hunyuan_video_path(config: dict, seed: int) -> Callable[[float], dict]:
    from tests.test_hunyuan_video import make_inputs

    inputs = make_inputs(config, 1, (2, 2, 2), (3,), 5, seed=seed)
    return _tensor_path(inputs, "hidden_states", seed, lambda s: torch.tensor([s * 1000]))


def _hunyuan_video_indicator(model: Any, call: dict) -> torch.Tensor:
    temb, _ = model.time_text_embed(call["timestep"], call["pooled_projections"], call["guidance"])
    return model.transformer_blocks[0].norm1(model.x_embedder(call["hidden_states"]), temb)[0]


def _hunyuan_video15_path(config: dict, seed: int) -> Callable[[float], dict]:
    from tests.tiny_configs import hunyuan_video15_inputs

    inputs = hunyuan_video15_inputs(config, 1, (1, 2, 2), (3,), 5, (2,), 3, 2, True, seed=seed)
    return _tensor_path(inputs, "hidden_states", seed, lambda s: torch.tensor([s * 1000]))


def _hunyuan_video15_indicator(model: Any, call: dict) -> torch.Tensor:
    temb = model.time_embed(call["timestep"])
    return model.transformer_blocks[0].norm1(model.x_embedder(call["hidden_states"]), temb)[0]


def _qwen_image_path(config: dict, seed: int) -> Callable[[float], dict]:
    from tests.test_qwen_image import make_inputs

    inputs = make_inputs(config, 1, [[(1, 4, 4)]], 5, seed=seed)
    return _tensor_path(inputs, "hidden_states", seed, lambda s: torch.tensor([s]))


def _qwen_image_indicator(model: Any, call: dict) -> torch.Tensor:
    hidden = model.img_in(call["hidden_states"])
    temb = model.time_text_embed(call["timestep"], hidden.dtype)
    block = model.transformer_blocks[0]
    shift, scale = block.img_mod(temb).chunk(6, dim=-1)[:2]
    return block.img_norm1(hidden) * (1 + scale[:, None]) + shift[:, None]


def _qwen_image21_path(config: dict, seed: int) -> Callable[[float], dict]:
    from tests.test_qwen_image21 import make_inputs

    # Text, a condition image, text, then the generated image; one padded text token.
    inputs = make_inputs(config, 1, "tttiittt", [(1, 2, 4)], (1, 4, 2), [1], seed=seed)
    return _tensor_path(inputs, "hidden_states", seed, lambda s: torch.tensor([s]))


def _qwen_image21_indicator(model: Any, call: dict) -> torch.Tensor:
    """Block 0's img_norm1 output scaled by the shared modulation of the real timestep, on the generated image's
    tokens (the joint sequence's last ones)."""
    joint = _z_image_stream(model, call, "forward_blocks")
    hidden = model.img_in(call["hidden_states"])
    temb = model.time_text_embed(torch.cat([call["timestep"], call["timestep"].new_zeros(1)]), hidden.dtype)
    scale = model.modulation(temb).chunk(4, dim=-1)[0][:-1]
    generated = math.prod(call["img_shapes"][0][-1])
    return model.transformer_blocks[0].img_norm1(joint)[:, -generated:] * (1 + scale[:, None])


def _z_image_path(config: dict, seed: int) -> Callable[[float], dict]:
    from tests.test_z_image import make_inputs

    # Two samples of different sizes, as the model takes them: a list.
    inputs = make_inputs(config, [(1, 4, 4), (1, 2, 6)], [5, 3], seed=seed)
    latents = [_flow(x, seed + i) for i, x in enumerate(inputs["x"])]
    # Z-Image's time runs the other way: t = 1 - sigma.
    return lambda sigma: {**inputs, "x": [x(sigma) for x in latents], "t": torch.full((2,), 1 - sigma)}


def _z_image_stream(model: Any, call: dict, method: str) -> torch.Tensor:
    """What the model's `method` receives in a plain call: `teacache_prelude` the embedded image tokens (B, Li, D),
    `forward_blocks` the joint stream after the refiners (B, L, D)."""
    captured = {}
    original = getattr(model, method)

    def capture(hidden_states: torch.Tensor, **inputs: Any) -> Any:
        captured["input"] = hidden_states
        return original(hidden_states, **inputs)

    setattr(model, method, capture)
    try:
        model(**call)
    finally:
        delattr(model, method)
    return captured["input"]


def _z_image_scaled_input(blocks: str, method: str) -> Callable[[Any, dict], torch.Tensor]:
    """The first block of `blocks`: its attention_norm1 output scaled by (1 + scale_msa)."""

    def indicator(model: Any, call: dict) -> torch.Tensor:
        first = getattr(model, blocks)[0]
        scale_msa = 1.0 + first.adaLN_modulation(model.t_embedder(call["t"] * model.config.t_scale)).chunk(4, dim=1)[0]
        return first.attention_norm1(_z_image_stream(model, call, method)) * scale_msa[:, None]

    return indicator


CASES: dict[str, FamilyCase] = {
    case.family: case
    for case in (
        FamilyCase("flux", "test_flux", _flux_path, {"modulated_input": _flux_indicator}),
        FamilyCase("flux2", "test_flux2", _flux2_path, {"modulated_input": _flux2_indicator}),
        FamilyCase("wan", "test_wan", _wan_path, _WAN_INDICATORS),
        FamilyCase(
            "hunyuan_video", "test_hunyuan_video", _hunyuan_video_path, {"modulated_input": _hunyuan_video_indicator}
        ),
        FamilyCase(
            "hunyuan_video15",
            "test_hunyuan_video15",
            _hunyuan_video15_path,
            {"modulated_input": _hunyuan_video15_indicator},
        ),
        FamilyCase("qwen_image", "test_qwen_image", _qwen_image_path, {"modulated_input": _qwen_image_indicator}),
        FamilyCase(
            "qwen_image21", "test_qwen_image21", _qwen_image21_path, {"modulated_input": _qwen_image21_indicator}
        ),
        FamilyCase(
            "z_image",
            "test_z_image",
            _z_image_path,
            {
                "modulated_input": _z_image_scaled_input("layers", "forward_blocks"),
                "refiner_modulated_input": _z_image_scaled_input("noise_refiner", "teacache_prelude"),
            },
            output=lambda result: torch.cat([sample.flatten() for sample in result[0]]),
        ),
    )
}
