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
from .base import Conditioning, Pipeline
from .shared import (
    check_true_cfg,
    flow_match_mu,
    flux_image_ids,
    pack_2x2,
    to_unit_range,
    unpack_2x2,
    unpaired_true_cfg,
)

__all__ = ["FluxTextToImagePipeline"]


class FluxTextToImagePipeline(Pipeline):
    """FLUX.1-dev / -schnell: CLIP-L (pooled) + T5 text encoders, 16-channel VAE, 2x2 packed latents."""

    family: ClassVar[str] = "flux"
    diffusers_class_name: ClassVar[str] = "FluxPipeline"
    transformer_class: ClassVar[type] = FluxTransformer2DModel
    text_component_names: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    sampling_extras: ClassVar[frozenset[str]] = frozenset({"true_cfg_scale"})
    cfg_rule: ClassVar[str] = "true CFG runs when true_cfg_scale > 1 and a negative prompt is given"
    broadcasts_negative: ClassVar[bool] = True
    max_sequence_length_limit: ClassVar[int | None] = 512  # T5's trained length
    rounds_size: ClassVar[bool] = True  # as diffusers, with a warning

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
        return self.call_transformer(
            transformer, latents, timestep, condition, guidance=self._guidance, img_ids=self._image_ids
        )

    def cfg_scale(self, t: torch.Tensor, params: SamplingParams) -> float:
        # Embedded guidance is the model's own; a negative prompt adds true CFG with its own scale.
        return params.true_cfg_scale

    def decode(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        factor = self.vae_scale_factor()
        latents = unpack_2x2(latents, params.height // factor, params.width // factor)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return to_unit_range(self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0])
