"""Qwen-Image-2.1 text-to-image: a Qwen3-VL prompt encoding, one single-stream transformer, plain true CFG.

As diffusers' `QwenImage21Pipeline` (text-to-image): the prompt is read by Qwen3-VL in a raw chat template (the
reference's encoding is reused as is); the latents are not patched (one token per 16 x 16 pixel tile); the
generated image's slots follow the text in the transformer's `img_mask`. CFG runs when `guidance_scale > 1` and a
negative prompt is given (`neg + g * (pos - neg)`, no rescaling; the model card samples without it). The schedule
is the checkpoint's `sample_sigmas` (in `model_index.json`) where it has them, else `linspace(1, 1 / steps)`,
shifted by the resolution's `mu`.

The prefix key/value cache: with `causal_condition` the text tokens' keys and values do not change between steps,
so the first step stores them and later steps compute only the generated image's tokens, as the reference does by
default. TeaCache and the prefix cache do not combine: a skipped step adds the residual the block stack made last
time, which must span the same tokens every step, while the prefix cache shortens the stack's sequence after the
first step. With TeaCache on, every step runs the whole sequence (what the reference's `use_kv_cache=False` does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..models import QwenImage21Transformer2DModel
from ..models.qwen_image21 import QwenImage21KVCache
from ..params import SamplingParams
from .base import Conditioning, Pipeline
from .loading import read_model_index
from .shared import flow_match_mu, negative_prompt_cfg, to_unit_range, unpaired_guidance_scale

__all__ = ["QwenImage21TextToImagePipeline"]

# The VAE compresses 16x spatially and the transformer reads latents unpatched (the reference's constant).
VAE_SCALE_FACTOR = 16
# A vision-language slot of `img_mask` stands for a 2 x 2 group of latent tokens.
TOKENS_PER_SLOT = 4


class QwenImage21TextToImagePipeline(Pipeline):
    """Qwen-Image-2.1: Qwen3-VL prompt encoding with its processor, `AutoencoderKLQwenImage21` (RGBA for the
    released VAE's four output channels: `images` is then (B, 4, H, W)), flow-matching Euler."""

    family: ClassVar[str] = "qwen_image21"
    diffusers_class_name: ClassVar[str] = "QwenImage21Pipeline"
    transformer_class: ClassVar[type] = QwenImage21Transformer2DModel
    text_component_names: ClassVar[tuple[str, ...]] = ("text_encoder", "processor")
    cfg_rule: ClassVar[str] = "CFG runs when guidance_scale > 1 and a negative prompt is given"
    reads_max_sequence_length: ClassVar[bool] = False
    rounds_size: ClassVar[bool] = True  # as diffusers, with a warning
    # Keep the text tokens' keys and values after the first step (the reference's default); TeaCache turns it off.
    use_kv_cache: bool = True

    def __init__(self, *args: Any, sample_sigmas: list[float] | None = None, **kwargs: Any) -> None:
        """`Pipeline`'s arguments, and the checkpoint's `sample_sigmas` (None: the default schedule)."""
        super().__init__(*args, **kwargs)
        if sample_sigmas is not None:
            if not isinstance(sample_sigmas, list | tuple) or not sample_sigmas:
                raise TypeError(f"sample_sigmas must be None or a non-empty list of floats, got {sample_sigmas!r}")
            sample_sigmas = [float(sigma) for sigma in sample_sigmas]
        self.sample_sigmas = sample_sigmas

    @classmethod
    def folder_settings(cls, path: Path) -> dict[str, Any]:
        """The checkpoint's `sample_sigmas` (its pipeline config in `model_index.json`), when it has them."""
        return {"sample_sigmas": read_model_index(path).get("sample_sigmas")}

    def text_helper(self) -> Any:
        if self._text_helper is None:
            import diffusers

            self._text_helper = diffusers.QwenImage21Pipeline(
                scheduler=None, vae=None, transformer=None, **self.text_components
            )
        return self._text_helper

    def vae_scale_factor(self) -> int:
        return VAE_SCALE_FACTOR

    def size_multiple(self) -> int:
        return VAE_SCALE_FACTOR * 2

    def check_params(self, params: SamplingParams) -> None:
        super().check_params(params)
        if self.sample_sigmas is not None and params.num_inference_steps != len(self.sample_sigmas):
            raise ValueError(
                f"num_inference_steps must be {len(self.sample_sigmas)} for this checkpoint: its schedule is its "
                f"{len(self.sample_sigmas)} sample_sigmas (model_index.json), got {params.num_inference_steps}"
            )

    def uses_cfg(self, params: SamplingParams) -> bool:
        return negative_prompt_cfg(params)

    def ignored_settings(self, params: SamplingParams) -> dict[str, str]:
        return super().ignored_settings(params) | unpaired_guidance_scale(params, self.cfg_rule)

    def _latent_grid(self, params: SamplingParams) -> tuple[int, int]:
        return params.height // VAE_SCALE_FACTOR, params.width // VAE_SCALE_FACTOR

    def encode_prompt(self, prompts: list[str], params: SamplingParams) -> Conditioning:
        """The reference's encoding; `img_mask` gains the generated image's slots, and the branch its own prefix
        cache (unless TeaCache is on, see the module's docstring)."""
        embeds, mask, image_slots = self.text_helper().encode_prompt(prompt=prompts, image=None, device=self.device)
        height, width = self._latent_grid(params)
        target = image_slots.new_ones(image_slots.shape[0], height * width // TOKENS_PER_SLOT)
        tensors = {
            "encoder_hidden_states": embeds,
            "encoder_hidden_states_mask": mask,
            "img_mask": torch.cat([image_slots, target], dim=1),  # (B, L_text + L_gen / 4) bool
        }
        num_blocks = len(self.transformer.transformer_blocks)
        if self.use_kv_cache and self.transformer.config.causal_condition and num_blocks and not params.teacache_params:
            tensors["kv_cache"] = QwenImage21KVCache(num_blocks)
        return Conditioning(tensors)

    def prepare_latents(self, batch: int, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
        height, width = self._latent_grid(params)
        channels = self.transformer.config.in_channels
        dtype = self.text_components["text_encoder"].dtype
        # Drawn with a frame axis (B, 1, C, H, W), as the reference does, so a seed gives the same noise.
        noise = torch.randn((batch, 1, channels, height, width), generator=generator, dtype=dtype)
        self._img_shapes = [[(1, height, width)]] * batch
        return noise.view(batch, channels, height * width).transpose(1, 2).to(self.device)  # (B, L, C)

    def make_timesteps(self, scheduler: Any, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        steps = params.num_inference_steps
        sigmas = self.sample_sigmas if self.sample_sigmas is not None else np.linspace(1.0, 1 / steps, steps)
        mu = flow_match_mu(latents.shape[1], scheduler.config)
        scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        scheduler.set_begin_index(0)
        return scheduler.timesteps

    def predict(
        self, transformer: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor, condition: Conditioning
    ) -> torch.Tensor:
        timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
        extra: dict[str, Any] = {"img_shapes": self._img_shapes}
        cache = condition.tensors.get("kv_cache")
        if cache is not None:
            # The branch's first call fills its cache; every later one reads it.
            extra["kv_cache_mode"] = "extract" if cache.get_layer(0).k is None else "cached"
        prediction = self.call_transformer(transformer, latents, timestep, condition, **extra)
        return prediction[:, -latents.shape[1] :]  # the generated image's tokens

    def decode(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        height, width = self._latent_grid(params)
        batch, _, channels = latents.shape
        latents = latents.transpose(1, 2).reshape(batch, channels, 1, height, width).to(self.vae.dtype)
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
        return to_unit_range(self.vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0])
