"""Qwen-Image-Layered: decompose an input image into RGBA layers.

The transformer denoises `layers + 1` frames at once, the composite first and then each layer, with the input
image's latents appended as a condition frame (`use_layer3d_rope` puts it at frame position -1 and
`additional_t_cond` marks the RGBA mode). The prompt describes the image; the text encoder reads it without the
image. The VAE encodes and decodes four channels (RGBA); the composite frame is dropped at decoding, so a result
holds `images` of shape (B, layers, 4, H, W) in [0, 1].

A blank prompt is replaced by a caption of the input image, which the Qwen2.5-VL text encoder writes when asked
with the reference's captioning instruction (English, or Chinese with `caption_language = "zh"`, diffusers'
default); `result.prompt` records it.

As diffusers' QwenImageLayeredPipeline: the input image is resized to about `vae_image_area` pixels (640 x 640,
the model card's recommended bucket; 1024 x 1024 is the other), the schedule is linear in sigma from 1 towards 0
with a shift `mu` from the condition's token count, and the CFG prediction is rescaled to the positive one's norm
only when `cfg_normalize` (the model card turns it on; diffusers' default is off). The output size is
`height` x `width`; the reference generates at `output_size(image)`, the input's bucket size.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from ..checks import require_int
from ..params import SamplingParams
from .base import Conditioning, Pipeline
from .qwen_image import QwenImageTextToImagePipeline
from .qwen_image_edit import QwenImageEditPipeline, check_edit_images
from .shared import pack_2x2, to_unit_range, unpack_2x2

__all__ = ["QwenImageLayeredPipeline"]

DEFAULT_LAYERS = 4
# The reference's limit on a caption's length, in generated tokens.
CAPTION_MAX_NEW_TOKENS = 512
CAPTION_LANGUAGES = ("en", "zh")
# The reference's `mu` = sqrt(condition tokens / the token count of a 256 x 256 image).
_BASE_TOKENS = 256 * 256 / 16 / 16


class QwenImageLayeredPipeline(QwenImageEditPipeline):
    """Qwen-Image-Layered: `pipe(prompt, params, image=rgba, layers=4)`."""

    diffusers_class_name: ClassVar[str] = "QwenImageLayeredPipeline"
    image_mode: ClassVar[str] = "RGBA"
    call_inputs: ClassVar[tuple[str, ...]] = ("layers",)
    captions_blank_prompts: ClassVar[bool] = True
    rounds_size: ClassVar[bool] = False  # diffusers' takes no height and width (its size follows the image)
    vae_image_area: int = 640 * 640
    cfg_normalize: bool = True
    # The language of the instruction a blank prompt's caption is asked with: the model card's example asks in
    # English; diffusers' default (`use_en_prompt=False`) is Chinese.
    caption_language: str = "en"

    def check_inputs(self, params: SamplingParams, **inputs: Any) -> None:
        self._layers = require_int("layers", inputs.get("layers", DEFAULT_LAYERS), 1, TypeError)
        given_list = isinstance(inputs.get("image"), list | tuple)  # captioned as given (see `_prepare_images`)
        self._images = self._prepare_images(check_edit_images(self, inputs, extra=self.call_inputs), given_list)

    def complete_prompts(self, prompts: list[str]) -> list[str]:
        """Each blank prompt (empty or whitespace; diffusers captions "" and " ") replaced by the caption of the
        input image, written once per call."""
        if all(text.strip() for text in prompts):
            return prompts
        caption = self.caption(self._images.condition[0])
        return [text if text.strip() else caption for text in prompts]

    def caption(self, image: Any) -> str:
        """The text encoder's description of `image` (the input image as the VAE reads it), asked with the
        reference's captioning instruction in `caption_language`: at most 512 new tokens, decoded with the text
        encoder's own generation settings (greedy unless its generation config samples), as the reference."""
        if self.caption_language not in CAPTION_LANGUAGES:
            raise ValueError(f"caption_language must be one of {CAPTION_LANGUAGES}, got {self.caption_language!r}")
        processor, encoder = self.text_components["processor"], self.text_components["text_encoder"]
        if processor is None:
            raise ValueError(
                "a blank prompt is captioned from the input image by the processor and the text encoder, but this "
                "pipeline has no processor: give a prompt describing the input image"
            )
        if not encoder.can_generate():
            raise TypeError(
                f"a blank prompt is captioned from the input image by the text encoder, but "
                f"{type(encoder).__name__} cannot generate text (Qwen2_5_VLForConditionalGeneration can): give a "
                "prompt describing the input image"
            )
        helper = self.text_helper()  # the reference pipeline, whose instructions these are
        instructions = {"en": helper.image_caption_prompt_en, "zh": helper.image_caption_prompt_cn}
        inputs = processor(text=instructions[self.caption_language], images=image, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        tokens = encoder.generate(**inputs, max_new_tokens=CAPTION_MAX_NEW_TOKENS)  # (1, L_in + L_new)
        new_tokens = tokens[:, inputs["input_ids"].shape[1] :]
        text = processor.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text[0].strip()

    def encode_prompt(self, prompts: list[str], params: SamplingParams) -> Conditioning:
        # The prompt alone, without the image: Qwen-Image's text encoding (this family's reference helper).
        return QwenImageTextToImagePipeline.encode_prompt(self, prompts, params)

    def prepare_latents(
        self, batch: int, params: SamplingParams, generator: torch.Generator, image: Any = None, layers: Any = None
    ) -> torch.Tensor:
        dtype = self.text_components["text_encoder"].dtype
        self._image_tokens = self._encode_image(self._images.pixels[0].to(self.device, dtype), batch)
        factor = self.vae_scale_factor()
        height, width = params.height // factor, params.width // factor
        channels = self.transformer.config.in_channels // 4
        frames = self._layers + 1  # the composite, then each layer
        noise = torch.randn((batch, frames, channels, height, width), generator=generator, dtype=dtype)
        latents = pack_2x2(noise.view(batch * frames, channels, height, width))  # (B * F, L, C * 4)
        condition_width, condition_height = self._images.sizes[0]
        shapes = [(1, height // 2, width // 2)] * frames + [
            (1, condition_height // factor // 2, condition_width // factor // 2)
        ]
        self._img_shapes = [shapes] * batch
        return latents.reshape(batch, -1, latents.shape[-1]).to(self.device)  # (B, F * L, C * 4)

    def make_timesteps(self, scheduler: Any, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        steps = params.num_inference_steps
        sigmas = np.linspace(1.0, 0, steps + 1)[:-1]
        mu = (self._image_tokens.shape[1] / _BASE_TOKENS) ** 0.5
        scheduler.set_timesteps(steps, device=self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return scheduler.timesteps

    def transformer_extras(self, latents: torch.Tensor) -> dict[str, Any]:
        # 0: the RGBA decomposition mode of the learned `additional_t_cond` embedding.
        return {"additional_t_cond": torch.zeros(latents.shape[0], dtype=torch.long, device=latents.device)}

    def guide(
        self, positive: torch.Tensor, negative: torch.Tensor | None, step: int, t: torch.Tensor, params: SamplingParams
    ) -> torch.Tensor:
        if self.cfg_normalize:
            return super().guide(positive, negative, step, t, params)
        return Pipeline.guide(self, positive, negative, step, t, params)

    def decode(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """Latents (B, F * L, C * 4) -> layers (B, layers, 4, H, W) in [0, 1] (the composite frame dropped)."""
        factor = self.vae_scale_factor()
        height, width = params.height // factor, params.width // factor
        batch, frames = latents.shape[0], self._layers + 1
        latents = unpack_2x2(latents.reshape(batch * frames, -1, latents.shape[-1]), height, width)
        latents = latents.view(batch, frames, -1, height, width)[:, 1:].to(self.vae.dtype)  # (B, layers, C, h, w)
        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, 1, config.z_dim, 1, 1).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, 1, config.z_dim, 1, 1).to(
            latents.device, latents.dtype
        )
        latents = latents / inverse_std + mean
        # All layers of all samples decode as one batch of single frames, as the reference does.
        pixels = self.vae.decode(latents.reshape(-1, config.z_dim, 1, height, width), return_dict=False)[0]
        pixels = to_unit_range(pixels[:, :, 0])  # (B * layers, 4, H, W)
        return pixels.view(batch, self._layers, *pixels.shape[1:])
