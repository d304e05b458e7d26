"""HunyuanVideo-1.5 text-to-video and image-to-video (480p and 720p, and the step-distilled 480p I2V).

Guidance rule (as diffusers' `HunyuanVideo15Pipeline`, whose `ClassifierFreeGuidance` guider ships in the
checkpoint folder): CFG runs when `guidance_scale != 1`, `pred = neg + g * (pos - neg)`, the negative
prompt defaulting to "". The checkpoint's guider supplies the default scale (6 for the base models, 1 for
the distilled ones); `SamplingParams.guidance_scale` overrides it.

Conditioning: Qwen2.5-VL states of the prompt in the reference's chat template, ByT5 states of its
quoted text (the glyph text; none without quotes), and the latent channels of a condition video
concatenated to the noise: zeros for text-to-video; for image-to-video the VAE latents of the image as the
first frame plus a first-frame mask, and the image's SigLIP tokens join the transformer's text stream.
The step-distilled model also embeds the next timestep (`timestep_r`).

Prompt encoding, image encoding and the condition latents are the reference pipeline's own methods (a
diffusers pipeline built from those components only); the denoising loop is ours.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch

from ..models import HunyuanVideo15Transformer3DModel
from ..params import SamplingParams
from .base import Conditioning, Pipeline
from .shared import HunyuanVideoVAESizes, check_frame_count, image_input, video_frames_to_unit_range

__all__ = ["HunyuanVideo15ImageToVideoPipeline", "HunyuanVideo15TextToVideoPipeline"]

# The only guider settings the loop reproduces: plain CFG over every step.
_GUIDER_DEFAULTS = {"guidance_rescale": 0.0, "use_original_formulation": False, "start": 0.0, "stop": 1.0}
# Text-to-video without an explicit size: the reference's 16:9 (width:height) bucket at the target size.
_DEFAULT_ASPECT = (16, 9)
_DEFAULT_FRAMES = 121


class HunyuanVideo15TextToVideoPipeline(HunyuanVideoVAESizes, Pipeline):
    """HunyuanVideo-1.5 T2V: Qwen2.5-VL + ByT5 text encoders, causal 3D VAE (4x temporal, 16x spatial)."""

    family: ClassVar[str] = "hunyuan_video15"
    diffusers_class_name: ClassVar[str] = "HunyuanVideo15Pipeline"
    transformer_class: ClassVar[type] = HunyuanVideo15Transformer3DModel
    text_component_names: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    extra_component_names: ClassVar[tuple[str, ...]] = ("guider",)
    sampling_extras: ClassVar[frozenset[str]] = frozenset({"flow_shift", "fps"})
    default_negative_prompt: ClassVar[str | None] = ""
    cfg_rule: ClassVar[str] = "CFG runs when guidance_scale != 1"
    is_video: ClassVar[bool] = True
    reads_max_sequence_length: ClassVar[bool] = False

    def __init__(
        self,
        transformer: HunyuanVideo15Transformer3DModel,
        scheduler: Any,
        vae: torch.nn.Module,
        zoo_entry: Any = None,
        guider: Any = None,
        **text_components: Any,
    ) -> None:
        super().__init__(transformer, scheduler, vae, zoo_entry=zoo_entry, **text_components)
        if vae is None:
            raise TypeError(f"{type(self).__name__} needs its VAE (AutoencoderKLHunyuanVideo15), got None")
        self.guider = guider
        self._check_guider()

    def _check_guider(self) -> None:
        if self.guider is None:
            return
        config = dict(self.guider.config)
        if type(self.guider).__name__ != "ClassifierFreeGuidance" or not config.get("enabled", True):
            raise ValueError(
                f"the checkpoint's guider must be an enabled ClassifierFreeGuidance, got {type(self.guider).__name__} "
                f"(enabled={config.get('enabled')})"
            )
        other = {k: config.get(k, v) for k, v in _GUIDER_DEFAULTS.items() if config.get(k, v) != v}
        if other:
            raise ValueError(
                f"the checkpoint's guider sets {other}; this pipeline runs plain CFG only ({_GUIDER_DEFAULTS})"
            )

    # ---- the reference's own encoders ------------------------------------------------------------

    def text_helper(self) -> Any:
        """diffusers' pipeline of this family built without its transformer and scheduler: its prompt,
        image and condition-latent encoders are the reference's, reused as they are."""
        if self._text_helper is None:
            import diffusers

            helper_class = getattr(diffusers, self.diffusers_class_name)
            self._text_helper = helper_class(
                transformer=None, scheduler=None, guider=None, vae=self.vae, **self.text_components
            )
            # Read from the transformer's config by the reference: its bucket size and image token width.
            self._text_helper.target_size = self.transformer.config.target_size
            self._text_helper.vision_states_dim = self.transformer.config.image_embed_dim
        return self._text_helper

    # ---- sizes and settings ------------------------------------------------------------------------

    def bucket_size(self, height: int, width: int) -> tuple[int, int]:
        """The reference's resolution for an (height, width) aspect ratio: the closest bucket of the
        checkpoint's `target_size` (what diffusers generates at; image-to-video uses the image's size)."""
        processor = self.text_helper().video_processor
        return tuple(processor.calculate_default_height_width(height, width, self.transformer.config.target_size))

    def default_sampling_params(self, teacache: str = "default", **overrides: Any) -> SamplingParams:
        """The zoo entry's defaults; without one, the reference's: the guider's scale, the 16:9 bucket of the
        checkpoint's target size, 121 frames, 50 steps, TeaCache off."""
        if self.zoo_entry is not None:
            return super().default_sampling_params(teacache, **overrides)
        height, width = self.bucket_size(_DEFAULT_ASPECT[1], _DEFAULT_ASPECT[0])
        defaults = dict(num_frames=_DEFAULT_FRAMES, height=height, width=width, num_inference_steps=50)
        if self.guider is not None:
            defaults["guidance_scale"] = float(self.guider.config.guidance_scale)
        return super().default_sampling_params(teacache, **{**defaults, **overrides})

    def check_params(self, params: SamplingParams) -> None:
        super().check_params(params)
        check_frame_count(params.num_frames, self.temporal_scale_factor(), "HunyuanVideo-1.5")

    def uses_cfg(self, params: SamplingParams) -> bool:
        return not math.isclose(params.guidance_scale, 1.0)

    # ---- the family's pieces -----------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str], params: SamplingParams) -> Conditioning:
        text, text_mask, glyph, glyph_mask = self.text_helper().encode_prompt(
            prompt=prompts, device=self.device, dtype=self.dtype, batch_size=len(prompts)
        )
        return Conditioning(
            {
                "encoder_hidden_states": text,
                "encoder_attention_mask": text_mask,
                "encoder_hidden_states_2": glyph,
                "encoder_attention_mask_2": glyph_mask,
            }
        )

    def prepare_latents(
        self, batch: int, params: SamplingParams, generator: torch.Generator, image: Any = None
    ) -> torch.Tensor:
        spatial = self.vae_scale_factor()
        frames = (params.num_frames - 1) // self.temporal_scale_factor() + 1
        shape = (batch, self.vae.config.latent_channels, frames, params.height // spatial, params.width // spatial)
        latents = torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)  # (B, C, F, H, W)
        self._image_embeds, self._condition = self.prepare_condition(latents, params, image)
        return latents

    def prepare_condition(
        self, latents: torch.Tensor, params: SamplingParams, image: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text-to-video: zero image tokens (B, 729, image_embed_dim) and zero condition channels (B, C + 1, F,
        H, W), which the transformer reads as "no image"."""
        helper = self.text_helper()
        batch = latents.shape[0]
        image_embeds = torch.zeros(
            batch, helper.vision_num_semantic_tokens, helper.vision_states_dim, dtype=self.dtype, device=self.device
        )
        condition, mask = helper.prepare_cond_latents_and_mask(latents, self.dtype, self.device)
        return image_embeds, torch.cat([condition, mask], dim=1)

    def make_timesteps(self, scheduler: Any, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        steps = params.num_inference_steps
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], device=self.device)
        self._timesteps = scheduler.timesteps
        return scheduler.timesteps

    def next_timestep(self, t: torch.Tensor) -> torch.Tensor | None:
        """The MeanFlow target time of the step at `t` (None for models without it): the next timestep, 0 after
        the last. Only the image-to-video reference passes it."""
        return None

    def predict(
        self, transformer: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor, condition: Conditioning
    ) -> torch.Tensor:
        model_input = torch.cat([latents, self._condition], dim=1)  # (B, 2C + 1, F, H, W)
        batch, dtype = model_input.shape[0], model_input.dtype
        timestep_r = self.next_timestep(t)
        timestep_r = None if timestep_r is None else timestep_r.expand(batch).to(dtype)
        timestep = t.expand(batch).to(dtype)
        return self.call_transformer(
            transformer, model_input, timestep, condition, timestep_r=timestep_r, image_embeds=self._image_embeds
        )

    def decode(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        # One sample at a time: the VAE's mid-block attention builds a mask for one sample, so diffusers' decoder
        # fails on a batch (a shape mismatch inside its attention); alone, each decodes as in diffusers.
        videos = [self.vae.decode(sample, return_dict=False)[0] for sample in latents.split(1)]
        return video_frames_to_unit_range(torch.cat(videos))


class HunyuanVideo15ImageToVideoPipeline(HunyuanVideo15TextToVideoPipeline):
    """HunyuanVideo-1.5 I2V (and its step-distilled 480p model): `image=` (a PIL image) is the first frame.

    The image is resized and centre-cropped to `height` x `width`. The reference generates at the bucket of
    the checkpoint's target size closest to the image's aspect ratio: `bucket_size(image.height,
    image.width)` gives it, and the zoo's sizes are the buckets of the model card's 16:9 examples.
    """

    diffusers_class_name: ClassVar[str] = "HunyuanVideo15ImageToVideoPipeline"
    text_component_names: ClassVar[tuple[str, ...]] = (
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "image_encoder",
        "feature_extractor",
    )

    def takes_image(self) -> str:
        return "required"

    def check_inputs(self, params: SamplingParams, **inputs: Any) -> None:
        from PIL import Image

        image = image_input(self, inputs)
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL image (the reference's image processors read PIL), got {image!r}")
        if image.width < 1 or image.height < 1:
            raise ValueError(f"image must have at least one pixel, got a PIL image of size {image.size}")

    def prepare_condition(
        self, latents: torch.Tensor, params: SamplingParams, image: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SigLIP tokens of the resized image (B, Lv, image_embed_dim); its VAE latents as the first latent frame
        (zeros after) and a first-frame mask, (B, C + 1, F, H, W)."""
        helper = self.text_helper()
        batch = latents.shape[0]
        # Resized in the image's own mode, as the reference does: the SigLIP processor and the VAE's each convert it
        # to RGB afterwards (an RGBA image composited on white for SigLIP, its alpha dropped for the VAE).
        image = helper.video_processor.resize(image, params.height, params.width, resize_mode="crop")
        image_embeds = helper.encode_image(image=image, batch_size=batch, device=self.device, dtype=self.dtype)
        condition, mask = helper.prepare_cond_latents_and_mask(
            latents=latents,
            image=image,
            batch_size=batch,
            height=params.height,
            width=params.width,
            dtype=self.dtype,
            device=self.device,
        )
        return image_embeds, torch.cat([condition, mask], dim=1)

    def next_timestep(self, t: torch.Tensor) -> torch.Tensor | None:
        if not self.transformer.config.use_meanflow:
            return None
        index = int((self._timesteps == t).nonzero()[0, 0])
        last = index == len(self._timesteps) - 1
        return torch.tensor([0.0], device=self.device) if last else self._timesteps[index + 1]
