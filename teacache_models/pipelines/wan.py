"""Wan 2.1 / 2.2 video: text-to-video, image-to-video, TI2V-5B and the two experts of Wan2.2 A14B.

Guidance rule (as diffusers' WanPipeline / WanImageToVideoPipeline): CFG runs when `guidance_scale > 1`,
`pred = neg + g * (pos - neg)`. Wan2.2 A14B routes each step to the high-noise expert `transformer`
while `t >= boundary_ratio * 1000`, then to the low-noise expert `transformer_2`, whose CFG scale is
`guidance_scale_2` (default: `guidance_scale`). Each expert keeps its own TeaCache state per CFG branch.

Conditioning:
- Wan2.1 I2V: the first frame, VAE-encoded with zeros for the other frames, plus a 4-channel frame mask,
  is concatenated to the noise on the channel axis; CLIP image tokens join the text context.
- Wan2.2 I2V A14B: the same latent concatenation, no CLIP.
- `last_image=` (Wan2.1 FLF2V, whose image embedder pairs two images' CLIP tokens; Wan2.2 I2V A14B): the last
  frame, given as the first is: VAE-encoded in the last frame's place and marked in the mask; FLF2V's CLIP tokens
  are the first and the last image's, in that order.
- TI2V-5B (`expand_timesteps` in `model_index.json`): per-token timesteps. With an image, the first latent
  frame is replaced by the encoded image at every step and its tokens carry timestep 0.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..models.wan import TEXT_CONTEXT_LEN, WanTransformer3DModel
from ..models.wan_experts import WanExpertPair
from ..params import SamplingParams
from .base import Conditioning, Pipeline
from .shared import check_frame_count, image_input, video_frames_to_unit_range

__all__ = ["WanImageToVideoPipeline", "WanTextToVideoPipeline", "check_image", "video_frames_to_unit_range"]

# diffusers' Wan pipelines refuse a height or width off this multiple, and round one on it down to the size multiple.
_DIFFUSERS_SIZE_MULTIPLE = 16


def check_image(image: Any) -> None:
    """An input image: a PIL image of any mode (it is converted to RGB), or a (3, H, W) / (1, 3, H, W)
    floating-point tensor with values in [0, 1]; at least one pixel either way."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.width < 1 or image.height < 1:
            raise ValueError(f"image must have at least one pixel, got a PIL image of size {image.size}")
        return
    if not isinstance(image, torch.Tensor) or not (
        (image.ndim == 3 and image.shape[0] == 3) or (image.ndim == 4 and image.shape[:2] == (1, 3))
    ):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else None
        raise TypeError(
            f"image must be a PIL image or a (3, H, W) / (1, 3, H, W) tensor in [0, 1], got {type(image).__name__}"
            + (f" of shape {shape}" if shape is not None else "")
        )
    if not image.is_floating_point():
        # Integer pixels (0-255) would be read as [0, 1] values and overflow when scaled to [-1, 1].
        hint = "; for 8-bit pixels pass image.float() / 255" if image.dtype == torch.uint8 else ""
        raise TypeError(f"an image tensor must be floating point with values in [0, 1], got dtype {image.dtype}{hint}")
    if image.shape[-2] < 1 or image.shape[-1] < 1:
        raise ValueError(f"image must have at least one pixel, got a tensor of shape {tuple(image.shape)}")
    low, high = image.min().item(), image.max().item()
    # A [-1, 1] tensor would be taken as already normalised by the VAE preprocessing but not by the CLIP
    # image processor, and NaN spreads to every frame: both are refused rather than half-handled.
    if not (low >= 0.0 and high <= 1.0):
        raise ValueError(
            f"image tensor values must be finite and in [0, 1], got min {low:g}, max {high:g}"
            + ("; for a [-1, 1] tensor pass (image + 1) / 2" if low >= -1.0 and high <= 1.0 else "")
        )


def _as_rgb(image: Any) -> Any:
    """A PIL image in RGB mode (grayscale, palette and RGBA images have other channel counts, which the VAE and
    the image encoder cannot read); tensors as they are."""
    from PIL import Image

    if isinstance(image, Image.Image) and image.mode != "RGB":
        return image.convert("RGB")
    return image


class WanTextToVideoPipeline(Pipeline):
    """Wan T2V (2.1 1.3B/14B, 2.2 A14B) and TI2V-5B: UMT5 text encoder, Wan VAE (per-channel latent
    statistics), flow matching. TI2V also takes an optional `image=` (the first frame)."""

    family: ClassVar[str] = "wan"
    diffusers_class_name: ClassVar[str] = "WanPipeline"
    transformer_class: ClassVar[type] = WanTransformer3DModel
    extra_component_names: ClassVar[tuple[str, ...]] = ("transformer_2",)
    sampling_extras: ClassVar[frozenset[str]] = frozenset({"guidance_scale_2", "flow_shift", "fps"})
    default_negative_prompt: ClassVar[str | None] = ""
    is_video: ClassVar[bool] = True
    # Whether an image is required (I2V) rather than optional (TI2V) or refused (T2V).
    requires_image: ClassVar[bool] = False

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        scheduler: Any,
        vae: torch.nn.Module | None,
        zoo_entry: Any = None,
        transformer_2: WanTransformer3DModel | None = None,
        boundary_ratio: float | None = None,
        expand_timesteps: bool = False,
        **text_components: Any,
    ) -> None:
        super().__init__(transformer, scheduler, vae, zoo_entry=zoo_entry, **text_components)
        if (transformer_2 is None) != (boundary_ratio is None):
            second = type(transformer_2).__name__ if transformer_2 is not None else None
            raise ValueError(
                "transformer_2 and boundary_ratio go together (Wan2.2 A14B's two experts): got transformer_2="
                f"{second}, boundary_ratio={boundary_ratio!r}"
            )
        if not isinstance(expand_timesteps, bool):
            raise TypeError(f"expand_timesteps must be True or False, got {expand_timesteps!r}")
        self.experts = None
        if transformer_2 is not None:
            num_train_timesteps = scheduler.config.get("num_train_timesteps", 1000)
            self.experts = WanExpertPair(transformer, transformer_2, boundary_ratio, num_train_timesteps)
        self.transformer_2 = transformer_2
        self.expand_timesteps = expand_timesteps
        if transformer_2 is not None:
            self._install_teacache_fits({"transformer_2": transformer_2})

    @classmethod
    def folder_settings(cls, path: Path) -> dict[str, Any]:
        """Wan2.2 A14B's expert boundary and TI2V's per-token timesteps, from `model_index.json`."""
        from .loading import read_model_index

        model_index = read_model_index(path)
        return {
            "boundary_ratio": model_index.get("boundary_ratio"),
            "expand_timesteps": bool(model_index.get("expand_timesteps", False)),
        }

    # ---- sizes ----------------------------------------------------------------------------------

    def vae_scale_factor(self) -> int:
        return self.vae.config.scale_factor_spatial

    def temporal_scale_factor(self) -> int:
        return self.vae.config.scale_factor_temporal

    def size_multiple(self) -> int:
        return self.vae_scale_factor() * self.transformer.config.patch_size[1]

    def fit_params(self, params: SamplingParams) -> SamplingParams:
        """A frame count off 4k+1 becomes the one diffusers' Wan pipelines generate, with a warning:
        `num_frames // 4 * 4 + 1` (so 6 gives 5 and 8 gives 9). A height or width that is a multiple of 16 (what
        diffusers checks) but not of the size multiple (32 for TI2V-5B's 16x VAE) is rounded down to it, with a
        warning, as diffusers does; other sizes are refused, as diffusers refuses them."""
        if params.height % _DIFFUSERS_SIZE_MULTIPLE == 0 and params.width % _DIFFUSERS_SIZE_MULTIPLE == 0:
            params = self._rounded_size(params)
        factor = self.temporal_scale_factor()
        if params.num_frames % factor == 1:
            return params
        frames = params.num_frames // factor * factor + 1
        warnings.warn(
            f"num_frames must be of the form {factor}k+1 for Wan, got {params.num_frames}: generating {frames} frames "
            f"(num_frames // {factor} * {factor} + 1), as diffusers' {self.diffusers_class_name} does",
            UserWarning,
            stacklevel=3,
        )
        return dataclasses.replace(params, num_frames=frames)

    def check_params(self, params: SamplingParams) -> None:
        super().check_params(params)
        check_frame_count(params.num_frames, self.temporal_scale_factor(), "Wan")
        if params.guidance_scale_2 is not None and self.experts is None:
            raise ValueError(
                "guidance_scale_2 is the CFG scale of Wan2.2's low-noise expert; this model has one transformer"
            )
        if self.transformer.config.added_kv_proj_dim is not None and self.max_sequence_length != TEXT_CONTEXT_LEN:
            # diffusers runs other lengths but then splits the context at the wrong token, a silently wrong video.
            raise ValueError(
                f"max_sequence_length must be {TEXT_CONTEXT_LEN} for this model, got {self.max_sequence_length}: its "
                f"attention (Wan2.1 I2V: image K/V projections) takes the last {TEXT_CONTEXT_LEN} tokens as text"
            )

    def ignored_settings(self, params: SamplingParams) -> dict[str, str]:
        ignored = super().ignored_settings(params)
        if params.guidance_scale_2 is not None and not self.uses_cfg(params):
            ignored["guidance_scale_2"] = (
                f"no negative branch runs ({self.cfg_rule}; guidance_scale_2 is the low-noise expert's scale then)"
            )
        return ignored

    def check_inputs(self, params: SamplingParams, **inputs: Any) -> None:
        if "last_image" in inputs and "last_image" not in self.call_inputs:
            raise TypeError(
                f"last_image is for first-last-frame models (Wan2.1 FLF2V, Wan2.2 I2V A14B); this Wan model is "
                f"{'TI2V, whose image is the first frame only' if self.expand_timesteps else 'text-to-video'}"
            )
        image = image_input(self, inputs)
        if image is None:
            return
        if self.takes_image() == "no":
            raise ValueError(
                "image is only for image-to-video models (I2V, or TI2V with expand_timesteps); this Wan model is "
                "text-to-video"
            )
        check_image(image)

    def takes_image(self) -> str:
        """ "required" (I2V: latents are concatenated with the image), "optional" (TI2V) or "no" (T2V)."""
        if self.requires_image or self._concatenates_condition():
            return "required"
        return "optional" if self.expand_timesteps else "no"

    def _concatenates_condition(self) -> bool:
        return self.transformer.config.in_channels != self.vae.config.z_dim and not self.expand_timesteps

    # ---- the family's pieces --------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str], params: SamplingParams) -> Conditioning:
        embeds, _ = self.text_helper().encode_prompt(
            prompt=prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        return Conditioning({"encoder_hidden_states": embeds.to(self._text_dtype())})

    def _text_dtype(self) -> torch.dtype:
        return self.transformer.condition_embedder.text_embedder.linear_1.weight.dtype

    def uses_cfg(self, params: SamplingParams) -> bool:
        return params.guidance_scale > 1

    def prepare_latents(
        self, batch: int, params: SamplingParams, generator: torch.Generator, image: Any = None, last_image: Any = None
    ) -> torch.Tensor:
        spatial, temporal = self.vae_scale_factor(), self.temporal_scale_factor()
        height, width = params.height // spatial, params.width // spatial
        frames = (params.num_frames - 1) // temporal + 1
        z_dim = self.vae.config.z_dim
        channels = z_dim if self.takes_image() == "required" else self.transformer.config.in_channels
        noise = torch.randn((batch, channels, frames, height, width), generator=generator, dtype=torch.float32)
        latents = noise.to(self.device)  # (B, C, F, H, W)

        self._image_tokens = None
        self._concat_condition = None
        self._first_frame = None
        # Per-token timesteps mask: 0 where a token is the given first frame (TI2V), 1 elsewhere.
        self._timestep_mask = (
            torch.ones((1, 1, frames, height, width), device=self.device) if self.expand_timesteps else None
        )
        if image is None:
            return latents
        image = _as_rgb(image)
        last_image = None if last_image is None else _as_rgb(last_image)
        if self.transformer.config.image_dim is not None:  # Wan2.1 I2V: CLIP image tokens
            images = image if last_image is None else [image, last_image]
            tokens = self.text_helper().encode_image(images, self.device)  # (1 or 2, Li, image_dim)
            # FLF2V: (2B, Li, image_dim), each sample's first and last image next to each other, as its embedder pairs.
            self._image_tokens = tokens.repeat(batch, 1, 1).to(self._text_dtype())
        pixels = self._preprocess_image(image, params)  # (1, 3, 1, H, W)
        if self.expand_timesteps:
            condition = self._encode_latents(pixels, batch)  # (B, z, 1, h, w)
            self._timestep_mask[:, :, 0] = 0
            self._first_frame = condition
            return latents
        given = [pixels] if last_image is None else [pixels, self._preprocess_image(last_image, params)]
        padding = pixels.new_zeros(1, 3, params.num_frames - len(given), params.height, params.width)
        video = torch.cat([given[0], padding, *given[1:]], dim=2)  # (1, 3, num_frames, H, W)
        condition = self._encode_latents(video, batch)  # (B, z, F, h, w)
        # Which pixel frames are given, folded to latent frames: the first latent frame stands for
        # `temporal` copies of the first pixel frame, so the mask has `temporal` channels.
        mask = torch.zeros(batch, 1, params.num_frames + temporal - 1, height, width)
        mask[:, :, :temporal] = 1
        if last_image is not None:
            mask[:, :, -1] = 1
        mask = mask.view(batch, frames, temporal, height, width).transpose(1, 2).to(condition.device)
        self._concat_condition = torch.cat([mask, condition], dim=1)  # (B, temporal + z, F, h, w)
        return latents

    def _preprocess_image(self, image: Any, params: SamplingParams) -> torch.Tensor:
        """Resize to the output size and scale to [-1, 1] with diffusers' video processor (the reference's)."""
        from diffusers.video_processor import VideoProcessor

        processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor())
        if isinstance(image, torch.Tensor) and image.ndim == 3:
            image = image.unsqueeze(0)
        pixels = processor.preprocess(image, height=params.height, width=params.width)
        return pixels.to(self.device, torch.float32).unsqueeze(2)

    def _encode_latents(self, video: torch.Tensor, batch: int) -> torch.Tensor:
        """Pixels (1, 3, F, H, W) -> normalised latents (B, z, F', h, w): the mode of the VAE posterior."""
        encoded = self.vae.encode(video.to(self.vae.dtype)).latent_dist.mode()
        latents = encoded.repeat(batch, 1, 1, 1, 1).to(self.device, torch.float32)
        mean, inverse_std = self._latent_statistics(latents)
        return (latents - mean) * inverse_std

    def _latent_statistics(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        # The reciprocal is taken after the cast, in the latents' dtype, as the reference does: in float16 the
        # other order rounds differently and shifts every decoded frame.
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
        return mean, inverse_std

    def make_timesteps(self, scheduler: Any, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        scheduler.set_timesteps(params.num_inference_steps, device=self.device)
        scheduler.set_begin_index(0)
        return scheduler.timesteps

    def make_scheduler(self, params: SamplingParams) -> Any:
        # Wan checkpoints ship UniPC with `flow_shift`; flow-matching Euler calls it `shift`.
        key = "flow_shift" if "flow_shift" in self.scheduler.config else "shift"
        overrides = {key: params.flow_shift} if params.flow_shift is not None else {}
        return type(self.scheduler).from_config(self.scheduler.config, **overrides)

    def transformer_for_step(self, t: torch.Tensor) -> torch.nn.Module:
        return self.transformer if self.experts is None else self.experts.expert_for(t)

    def teacache_models(self) -> dict[str, torch.nn.Module]:
        if self.transformer_2 is None:
            return {"transformer": self.transformer}
        return {"transformer": self.transformer, "transformer_2": self.transformer_2}

    def _model_input(self, latents: torch.Tensor) -> torch.Tensor:
        if self._first_frame is not None:
            mask = self._timestep_mask
            latents = (1 - mask) * self._first_frame + mask * latents
        elif self._concat_condition is not None:
            latents = torch.cat([latents, self._concat_condition], dim=1)
        return latents

    def predict(
        self, transformer: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor, condition: Conditioning
    ) -> torch.Tensor:
        batch = latents.shape[0]
        if self._timestep_mask is not None:
            _, p_h, p_w = transformer.config.patch_size
            per_token = (self._timestep_mask[0, 0][:, ::p_h, ::p_w] * t).flatten()  # (L,)
            timestep = per_token.unsqueeze(0).expand(batch, -1)  # (B, L)
        else:
            timestep = t.expand(batch)
        model_input = self._model_input(latents).to(self.dtype)
        return self.call_transformer(
            transformer, model_input, timestep, condition, encoder_hidden_states_image=self._image_tokens
        )

    def cfg_scale(self, t: torch.Tensor, params: SamplingParams) -> float:
        if self.experts is not None and self.experts.expert_for(t) is self.transformer_2:
            return params.guidance_scale if params.guidance_scale_2 is None else params.guidance_scale_2
        return params.guidance_scale

    def decode(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        if self._first_frame is not None:
            latents = self._model_input(latents)
        latents = latents.to(self.vae.dtype)
        mean, inverse_std = self._latent_statistics(latents)
        video = self.vae.decode(latents / inverse_std + mean, return_dict=False)[0]  # (B, 3, F, H, W)
        return video_frames_to_unit_range(video)


class WanImageToVideoPipeline(WanTextToVideoPipeline):
    """Wan2.1 I2V 480P/720P (CLIP-H image tokens) and Wan2.2 I2V A14B (no image encoder): `image=` is the
    first frame. The diffusers helper is built with the image encoder too, for its `encode_image`."""

    diffusers_class_name: ClassVar[str] = "WanImageToVideoPipeline"
    # The image encoder and its processor are None for Wan2.2 I2V (no CLIP).
    text_component_names: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer", "image_encoder", "image_processor")
    requires_image: ClassVar[bool] = True

    call_inputs: ClassVar[tuple[str, ...]] = ("last_image",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        needs_clip = self.transformer.config.image_dim is not None
        if needs_clip and (
            self.text_components["image_encoder"] is None or self.text_components["image_processor"] is None
        ):
            raise ValueError(
                "this transformer attends to CLIP image tokens (image_dim set, Wan2.1 I2V): image_encoder and "
                "image_processor are required"
            )

    def first_last_frame(self) -> bool:
        """Whether the transformer pairs two images' CLIP tokens (Wan2.1 FLF2V: a position table over both), so
        a call needs `last_image=`."""
        return self.transformer.config.pos_embed_seq_len is not None

    def check_inputs(self, params: SamplingParams, **inputs: Any) -> None:
        super().check_inputs(params, **inputs)
        last_image = inputs.get("last_image")
        if last_image is None:
            if self.first_last_frame():
                raise ValueError(
                    "this Wan checkpoint is first-last-frame (FLF2V: its image embedder pairs two images): pass "
                    "last_image=<last frame> as well as image="
                )
            return
        if self.transformer.config.image_dim is not None and not self.first_last_frame():
            raise ValueError(
                "last_image needs a first-last-frame checkpoint (Wan2.1 FLF2V, or Wan2.2 I2V A14B); this Wan2.1 I2V "
                "checkpoint's image embedder reads the CLIP tokens of one image"
            )
        check_image(last_image)
        if params.num_frames < 2:
            raise ValueError(
                f"last_image needs num_frames >= {self.temporal_scale_factor() + 1} (a first and a last frame), got "
                f"{params.num_frames}"
            )
