"""HunyuanVideo text-to-video: embedded guidance, optional true CFG with a negative prompt.

Guidance rule (as diffusers' HunyuanVideoPipeline): the released transformer is guidance-distilled, so
`guidance_scale` is embedded (times 1000) and one call per step suffices. True CFG runs only when
`true_cfg_scale > 1` and a negative prompt is given: `pred = neg + true_cfg_scale * (pos - neg)`; either
setting alone would do nothing, so it is an error.
Sigmas run linearly from 1 towards 0 (`num_inference_steps` of them), shifted by the scheduler.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from ..models import HunyuanVideoTransformer3DModel
from ..params import SamplingParams
from .base import Conditioning, Pipeline
from .shared import (
    HunyuanVideoVAESizes,
    check_frame_count,
    check_true_cfg,
    unpaired_true_cfg,
    video_frames_to_unit_range,
)

__all__ = ["HunyuanVideoTextToVideoPipeline"]


class HunyuanVideoTextToVideoPipeline(HunyuanVideoVAESizes, Pipeline):
    """HunyuanVideo: Llava-Llama-3 text states (prompt template, masked) + CLIP-L pooled embedding, causal
    3D VAE (4x temporal, 8x spatial)."""

    family: ClassVar[str] = "hunyuan_video"
    diffusers_class_name: ClassVar[str] = "HunyuanVideoPipeline"
    transformer_class: ClassVar[type] = HunyuanVideoTransformer3DModel
    text_component_names: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    sampling_extras: ClassVar[frozenset[str]] = frozenset({"true_cfg_scale", "flow_shift", "fps"})
    cfg_rule: ClassVar[str] = "true CFG runs when true_cfg_scale > 1 and a negative prompt is given"
    broadcasts_negative: ClassVar[bool] = True
    is_video: ClassVar[bool] = True
    # The Llama prompt length after the template is cropped (the reference's default).
    max_sequence_length: int = 256

    def check_params(self, params: SamplingParams) -> None:
        super().check_params(params)
        check_true_cfg(self, params)
        check_frame_count(params.num_frames, self.temporal_scale_factor(), "HunyuanVideo")

    def encode_prompt(self, prompts: list[str], params: SamplingParams) -> Conditioning:
        embeds, pooled, mask = self.text_helper().encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=self.max_sequence_length
        )
        dtype = self.dtype
        return Conditioning(
            {
                "encoder_hidden_states": embeds.to(dtype),
                "encoder_attention_mask": mask.to(dtype),
                "pooled_projections": pooled.to(dtype),
            }
        )

    def uses_cfg(self, params: SamplingParams) -> bool:
        return (params.true_cfg_scale or 1.0) > 1 and params.negative_prompt is not None

    def ignored_settings(self, params: SamplingParams) -> dict[str, str]:
        return super().ignored_settings(params) | unpaired_true_cfg(params, self.cfg_rule)

    def prepare_latents(self, batch: int, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
        spatial = self.vae_scale_factor()
        frames = (params.num_frames - 1) // self.temporal_scale_factor() + 1
        shape = (batch, self.transformer.config.in_channels, frames, params.height // spatial, params.width // spatial)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)  # (B, C, F, H, W)

    def make_timesteps(self, scheduler: Any, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        steps = params.num_inference_steps
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], device=self.device)
        scheduler.set_begin_index(0)
        guidance = torch.tensor([params.guidance_scale] * latents.shape[0], dtype=self.dtype, device=self.device)
        self._guidance = guidance * 1000.0
        return scheduler.timesteps

    def predict(
        self, transformer: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor, condition: Conditioning
    ) -> torch.Tensor:
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        return self.call_transformer(transformer, latents.to(self.dtype), timestep, condition, guidance=self._guidance)

    def cfg_scale(self, t: torch.Tensor, params: SamplingParams) -> float:
        # Embedded guidance is the model's own; a negative prompt adds true CFG with its own scale.
        return params.true_cfg_scale

    def decode(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return video_frames_to_unit_range(self.vae.decode(latents, return_dict=False)[0])
