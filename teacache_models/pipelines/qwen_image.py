"""Qwen-Image text-to-image: true CFG with norm rescaling.

Guidance rule (as diffusers' QwenImagePipeline): CFG runs when `guidance_scale > 1` and a negative prompt
is given (the zoo default is a blank " ", as in the official example). The combined prediction
`neg + g * (pos - neg)` is rescaled per token to the norm of the positive prediction. Here
`guidance_scale` is that CFG scale (diffusers calls it `true_cfg_scale`; the released transformer has
no guidance embedding).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from ..models import QwenImageTransformer2DModel
from ..params import SamplingParams
from .base import Conditioning, Pipeline
from .shared import (
    flow_match_mu,
    negative_prompt_cfg,
    pack_2x2,
    to_unit_range,
    unpack_2x2,
    unpaired_guidance_scale,
)

__all__ = ["QwenImageTextToImagePipeline"]


class QwenImageTextToImagePipeline(Pipeline):
    """Qwen-Image: Qwen2.5-VL text encoder (chat template, masked hidden states), Wan-style 3D VAE with
    per-channel latent statistics, 2x2 packed latents."""

    family: ClassVar[str] = "qwen_image"
    diffusers_class_name: ClassVar[str] = "QwenImagePipeline"
    transformer_class: ClassVar[type] = QwenImageTransformer2DModel
    default_negative_prompt: ClassVar[str | None] = " "
    cfg_rule: ClassVar[str] = "CFG runs when guidance_scale > 1 and a negative prompt is given"
    broadcasts_negative: ClassVar[bool] = True
    max_sequence_length_limit: ClassVar[int | None] = 1024  # the reference tokenizes at most 1024 prompt tokens
    rounds_size: ClassVar[bool] = True  # as diffusers, with a warning

    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.temperal_downsample)

    def size_multiple(self) -> int:
        return self.vae_scale_factor() * 2

    def encode_prompt(self, prompts: list[str], params: SamplingParams) -> Conditioning:
        embeds, mask = self.text_helper().encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return Conditioning({"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask})

    def uses_cfg(self, params: SamplingParams) -> bool:
        return negative_prompt_cfg(params)

    def ignored_settings(self, params: SamplingParams) -> dict[str, str]:
        return super().ignored_settings(params) | unpaired_guidance_scale(params, self.cfg_rule)

    def prepare_latents(self, batch: int, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
        factor = self.vae_scale_factor()
        height, width = params.height // factor, params.width // factor
        channels = self.transformer.config.in_channels // 4
        dtype = self.text_components["text_encoder"].dtype
        # Drawn with a frame axis (B, 1, C, H, W), as the reference does, so a seed gives the same noise.
        noise = torch.randn((batch, 1, channels, height, width), generator=generator, dtype=dtype)
        self._img_shapes = [[(1, height // 2, width // 2)]] * batch
        return pack_2x2(noise.view(batch, channels, height, width)).to(self.device)  # (B, L, C * 4)

    def make_timesteps(self, scheduler: Any, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        steps = params.num_inference_steps
        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = flow_match_mu(latents.shape[1], scheduler.config)
        scheduler.set_timesteps(steps, device=self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return scheduler.timesteps

    def transformer_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """The image tokens the transformer reads: the latents, and an editing model's reference images after."""
        return latents

    def predict(
        self, transformer: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor, condition: Conditioning
    ) -> torch.Tensor:
        timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
        tokens = self.transformer_tokens(latents)
        extra = self.transformer_extras(latents)
        prediction = self.call_transformer(
            transformer, tokens, timestep, condition, img_shapes=self._img_shapes, **extra
        )
        return prediction[:, : latents.shape[1]]  # the generated image's tokens

    def transformer_extras(self, latents: torch.Tensor) -> dict[str, Any]:
        """Keywords of the transformer call beyond the tokens, timestep, text and `img_shapes` (none here)."""
        return {}

    def guide(
        self, positive: torch.Tensor, negative: torch.Tensor | None, step: int, t: torch.Tensor, params: SamplingParams
    ) -> torch.Tensor:
        combined = super().guide(positive, negative, step, t, params)
        if negative is None:
            return combined
        # Per token, keep the positive prediction's norm: CFG changes the direction, not the magnitude.
        scale = torch.norm(positive, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True)
        return combined * scale

    def decode(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        factor = self.vae_scale_factor()
        height, width = params.height // factor, params.width // factor
        latents = unpack_2x2(latents, height, width).unsqueeze(2).to(self.vae.dtype)  # (B, C, 1, H, W)
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
        latents = latents / inverse_std + mean
        return to_unit_range(self.vae.decode(latents, return_dict=False)[0][:, :, 0])
