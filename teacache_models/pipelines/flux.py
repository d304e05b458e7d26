"""FLUX.1 text-to-image: embedded guidance, optional true CFG with a negative prompt.

Guidance rule (as diffusers' FluxPipeline): FLUX.1-dev embeds `guidance_scale` in the transformer (one
call per step). True CFG runs only when `true_cfg_scale > 1` and a negative prompt is given:
`pred = neg + true_cfg_scale * (pos - neg)`; either setting alone would do nothing, so it is an error.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from ..models import FluxTransformer2DModel
from ..params import SamplingParams
from .base import Conditioning, Pipeline, to_unit_range

__all__ = ["FluxTextToImagePipeline", "check_true_cfg", "flow_match_mu", "unpaired_true_cfg"]


def flow_match_mu(image_seq_len: int, scheduler_config: Any) -> float:
    """The resolution-dependent shift `mu`: linear in the token count between the scheduler's base and
    max sequence lengths (FLUX.1's schedule, shared by Qwen-Image and Z-Image)."""
    base_len = scheduler_config.get("base_image_seq_len", 256)
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    base_shift = scheduler_config.get("base_shift", 0.5)
    max_shift = scheduler_config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + (base_shift - slope * base_len)


def unpaired_true_cfg(params: SamplingParams, rule: str) -> dict[str, str]:
    """A true CFG scale > 1 without a negative prompt does nothing (Flux, HunyuanVideo)."""
    if params.true_cfg_scale is not None and params.true_cfg_scale > 1 and params.negative_prompt is None:
        return {"true_cfg_scale": f"it needs a negative prompt ({rule})"}
    return {}


def check_true_cfg(pipeline: Pipeline, params: SamplingParams) -> None:
    """True CFG's two settings go together: either alone would be silently ignored."""
    ignored = pipeline.ignored_settings(params)
    for name in ("true_cfg_scale", "negative_prompt"):
        if name in ignored:
            value = getattr(params, name)
            raise ValueError(f"{name}={value!r} has no effect: {ignored[name]}")


def pack_2x2(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4): 2x2 latent patches as tokens."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_2x2(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H/2 * W/2, C * 4) -> (B, C, H, W), the inverse of `pack_2x2` (H, W in latent cells)."""
    batch, _, features = tokens.shape
    patches = tokens.view(batch, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, features // 4, height, width)


class FluxTextToImagePipeline(Pipeline):
    """FLUX.1-dev / -schnell: CLIP-L (pooled) + T5 text encoders, 16-channel VAE, 2x2 packed latents."""

    family: ClassVar[str] = "flux"
    diffusers_class_name: ClassVar[str] = "FluxPipeline"
    transformer_class: ClassVar[type] = FluxTransformer2DModel
    text_component_names: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    sampling_extras: ClassVar[frozenset[str]] = frozenset({"true_cfg_scale"})
    cfg_rule: ClassVar[str] = "true CFG runs when true_cfg_scale > 1 and a negative prompt is given"
    max_sequence_length_limit: ClassVar[int | None] = 512  # T5's trained length

    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def size_multiple(self) -> int:
        return self.vae_scale_factor() * 2

    def encode_prompt(self, prompts: list[str], params: SamplingParams) -> Conditioning:
        embeds, pooled, text_ids = self.text_helper().encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return Conditioning({"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids})

    def uses_cfg(self, params: SamplingParams) -> bool:
        return (params.true_cfg_scale or 1.0) > 1 and params.negative_prompt is not None

    def ignored_settings(self, params: SamplingParams) -> dict[str, str]:
        ignored = super().ignored_settings(params) | unpaired_true_cfg(params, self.cfg_rule)
        if not self.transformer.config.guidance_embeds:
            ignored["guidance_scale"] = (
                "this transformer has no guidance embedding (as FLUX.1-schnell); its CFG is true_cfg_scale with "
                "a negative prompt"
            )
        return ignored

    def check_params(self, params: SamplingParams) -> None:
        super().check_params(params)
        check_true_cfg(self, params)

    def prepare_latents(self, batch: int, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
        factor = self.vae_scale_factor()
        height, width = params.height // factor, params.width // factor
        channels = self.transformer.config.in_channels // 4
        dtype = self.text_components["text_encoder_2"].dtype
        noise = torch.randn((batch, channels, height, width), generator=generator, dtype=dtype)
        self._image_ids = flux_image_ids(height // 2, width // 2).to(self.device, dtype)
        return pack_2x2(noise).to(self.device)  # (B, L, C * 4)

    def make_timesteps(self, scheduler: Any, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        steps = params.num_inference_steps
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        mu = flow_match_mu(latents.shape[1], scheduler.config)
        scheduler.set_timesteps(steps, device=self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        batch = latents.shape[0]
        if self.transformer.config.guidance_embeds:
            self._guidance = torch.full((batch,), params.guidance_scale, device=self.device, dtype=torch.float32)
        else:
            self._guidance = None
        return scheduler.timesteps

    def predict(
        self, transformer: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor, condition: Conditioning
    ) -> torch.Tensor:
        # The transformer takes sigma (t / 1000) and scales it back inside.
        timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
        return transformer(
            hidden_states=latents,
            timestep=timestep,
            guidance=self._guidance,
            img_ids=self._image_ids,
            return_dict=False,
            **condition.tensors,
        )[0]

    def cfg_scale(self, t: torch.Tensor, params: SamplingParams) -> float:
        # Embedded guidance is the model's own; a negative prompt adds true CFG with its own scale.
        return params.true_cfg_scale

    def decode(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        factor = self.vae_scale_factor()
        latents = unpack_2x2(latents, params.height // factor, params.width // factor)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return to_unit_range(self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0])


def flux_image_ids(height: int, width: int) -> torch.Tensor:
    """(H * W, 3) position ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)
