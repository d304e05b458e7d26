"""FLUX.2 [dev] and [klein]: text-to-image and editing with reference images.

Every FLUX.2 pipeline takes an optional `image=` (one PIL image or a list): reference images, encoded by the
VAE and appended to the noisy image's tokens with their own position ids (time axis 10, 20, ...), which the
transformer attends to; the prediction is read from the noisy image's tokens only.

Guidance rules (as diffusers):
- FLUX.2 [dev] (`Flux2Pipeline`): guidance-distilled, `guidance_scale` is embedded in the transformer, one
  call per step; no negative branch.
- FLUX.2 [klein] (`Flux2KleinPipeline`): the released 4B / 9B are step-distilled (`is_distilled` in
  `model_index.json`): one call per step and no guidance. The base (non-distilled) models run CFG with an
  empty negative prompt when `guidance_scale > 1`.
- FLUX.2 [klein] KV (`Flux2KleinKVPipeline`, distilled): reference images enter only the first step, whose
  call also fills the transformer's key/value cache of the reference tokens; later steps read the cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..models import Flux2Transformer2DModel
from ..params import SamplingParams
from .base import Conditioning, Pipeline
from .shared import refuse_unknown_inputs, to_unit_range

__all__ = ["Flux2ImagePipeline", "Flux2KleinImagePipeline", "Flux2KleinKVImagePipeline"]

# Reference images above this many pixels are scaled down to it (the reference pipeline's rule).
_MAX_REFERENCE_AREA = 1024 * 1024
# Reference image i sits at time coordinate 10 * (i + 1) of the position ids; the noisy image at 0.
_REFERENCE_TIME_SCALE = 10


def reference_images(pipeline: Pipeline, inputs: dict[str, Any]) -> list[Any]:
    """The `image=` of a call as a list of RGB PIL images (empty when not given); any other keyword, a
    non-image, or an image the reference pipeline refuses (a side under 64 pixels, an aspect ratio over 8)
    is an error naming it."""
    from PIL import Image

    refuse_unknown_inputs(pipeline, inputs, "only image=... (reference images)", ("image",))
    images = inputs.get("image")
    if images is None:
        return []
    given_list = isinstance(images, list | tuple)
    images = list(images) if given_list else [images]
    if not images:
        raise ValueError("image must be a PIL image or a non-empty list of them (reference images), got []")
    if len(images) > pipeline.max_images:
        raise ValueError(
            f"image holds {len(images)} reference images; {type(pipeline).__name__} takes at most "
            f"{pipeline.max_images} (Black Forest Labs' guidance for this model)"
        )
    checked = []
    for index, image in enumerate(images):
        where = f"image[{index}]" if given_list else "image"
        if not isinstance(image, Image.Image):
            raise TypeError(f"{where} must be a PIL image (a reference image), got {type(image).__name__}")
        width, height = image.size
        if min(width, height) < 64:
            raise ValueError(f"{where} is {width}x{height}: both sides of a reference image must be at least 64 px")
        if max(width / height, height / width) > 8:
            raise ValueError(f"{where} is {width}x{height}: a reference image's aspect ratio must be at most 8:1")
        checked.append(image.convert("RGB") if image.mode != "RGB" else image)
    return checked


def _pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) patchified latents -> (B, H * W, C) tokens, row-major."""
    return latents.flatten(2).transpose(1, 2)


def _patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) VAE latents -> (B, C * 4, H / 2, W / 2): each 2x2 patch in the channels."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(batch, channels * 4, height // 2, width // 2)


def _unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """The inverse of `_patchify`."""
    batch, channels, height, width = latents.shape
    patches = latents.reshape(batch, channels // 4, 2, 2, height, width).permute(0, 1, 4, 2, 5, 3)
    return patches.reshape(batch, channels // 4, height * 2, width * 2)


def _grid_ids(height: int, width: int, time: int = 0) -> torch.Tensor:
    """(H * W, 4) position ids (time, row, column, layer) of an image's tokens, row-major."""
    return torch.cartesian_prod(torch.tensor([time]), torch.arange(height), torch.arange(width), torch.tensor([0]))


class Flux2ImagePipeline(Pipeline):
    """FLUX.2 [dev]: Mistral-3 text encoder (three hidden layers stacked), the FLUX.2 VAE (batch-norm
    latent statistics), 2x2 patchified latents, embedded guidance; optional reference images."""

    family: ClassVar[str] = "flux2"
    diffusers_class_name: ClassVar[str] = "Flux2Pipeline"
    transformer_class: ClassVar[type] = Flux2Transformer2DModel
    cfg_rule: ClassVar[str] = "FLUX.2 [dev] embeds guidance_scale and runs no negative branch"
    # Reference images: BFL's editing guide (docs.bfl.ml) recommends at most 6 for [dev] and 4 for [klein].
    max_images: ClassVar[int] = 6
    max_sequence_length_limit: ClassVar[int | None] = 512
    rounds_size: ClassVar[bool] = True  # as diffusers, with a warning

    # ---- sizes and inputs -----------------------------------------------------------------------

    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def size_multiple(self) -> int:
        return self.vae_scale_factor() * 2

    def takes_image(self) -> str:
        return "optional"

    def check_inputs(self, params: SamplingParams, **inputs: Any) -> None:
        reference_images(self, inputs)

    def check_params(self, params: SamplingParams) -> None:
        super().check_params(params)
        for name, reason in self.ignored_settings(params).items():
            raise ValueError(f"{name}={getattr(params, name)!r} has no effect: {reason}")

    def uses_cfg(self, params: SamplingParams) -> bool:
        return False

    # ---- the family's pieces --------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str], params: SamplingParams) -> Conditioning:
        embeds, text_ids = self.text_helper().encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return Conditioning({"encoder_hidden_states": embeds, "txt_ids": text_ids})

    def prepare_latents(
        self, batch: int, params: SamplingParams, generator: torch.Generator, image: Any = None
    ) -> torch.Tensor:
        factor = self.vae_scale_factor()
        height, width = params.height // (factor * 2), params.width // (factor * 2)  # in tokens
        channels = self.transformer.config.in_channels
        dtype = self.text_components["text_encoder"].dtype
        noise = torch.randn((batch, channels, height, width), generator=generator, dtype=dtype)
        self._size = (height, width)
        self._image_ids = _grid_ids(height, width).to(self.device)
        self._references = self._encode_references(reference_images(self, {"image": image}), batch)
        return _pack(noise).to(self.device)  # (B, L, C)

    def _encode_references(self, images: list[Any], batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Reference images -> their tokens (B, L_ref, C) and position ids (L_ref, 4), or None."""
        if not images:
            return None
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        processor = Flux2ImageProcessor(vae_scale_factor=self.size_multiple())
        tokens, ids = [], []
        for index, image in enumerate(images):
            image, height, width = self._fitted_reference(image, processor)
            pixels = processor.preprocess(image, height=height, width=width, resize_mode="crop")
            latents = self._encode_image(pixels.to(self.vae.device, self.vae.dtype))  # (1, C, h, w)
            tokens.append(_pack(latents)[0])
            ids.append(_grid_ids(*latents.shape[2:], time=_REFERENCE_TIME_SCALE * (index + 1)))
        joined = torch.cat(tokens).unsqueeze(0).repeat(batch, 1, 1).to(self.device)  # (B, L_ref, C)
        return joined, torch.cat(ids).to(self.device)

    def _fitted_reference(self, image: Any, processor: Any) -> tuple[Any, int, int]:
        """A reference image shrunk to at most 1024 x 1024 pixels of area, and the (height, width) it is
        cropped to: each side down to a multiple of `size_multiple()`."""
        if image.width * image.height > _MAX_REFERENCE_AREA:
            image = processor._resize_to_target_area(image, _MAX_REFERENCE_AREA)
        multiple = self.size_multiple()
        return image, image.height // multiple * multiple, image.width // multiple * multiple

    def output_size(self, image: Any) -> tuple[int, int]:
        """(height, width) generated at when none is asked for: the first reference image's fitted size, as
        diffusers' FLUX.2 pipelines do."""
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        first = image[0] if isinstance(image, list | tuple) else image
        _, height, width = self._fitted_reference(first, Flux2ImageProcessor(vae_scale_factor=self.size_multiple()))
        return height, width

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (1, 3, H, W) in [-1, 1] -> normalised patchified latents (1, C * 4, H / 2f, W / 2f): the mode of
        the VAE posterior, standardised by the VAE's batch-norm statistics."""
        latents = _patchify(self.vae.encode(pixels).latent_dist.mode())
        mean, std = self._latent_statistics(latents)
        return (latents - mean) / std

    def _latent_statistics(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(
            latents.device, latents.dtype
        )
        return mean, std

    def make_timesteps(self, scheduler: Any, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        steps = params.num_inference_steps
        sigmas = None if scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        mu = compute_empirical_mu(image_seq_len=latents.shape[1], num_steps=steps)
        scheduler.set_timesteps(steps, device=self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        self._guidance = self._guidance_for(params, latents.shape[0])
        return scheduler.timesteps

    def _guidance_for(self, params: SamplingParams, batch: int) -> torch.Tensor | None:
        return torch.full([1], params.guidance_scale, device=self.device, dtype=torch.float32).expand(batch)

    def predict(
        self, transformer: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor, condition: Conditioning
    ) -> torch.Tensor:
        # The transformer takes sigma (t / 1000) and scales it back inside.
        timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
        hidden_states, ids = latents, self._image_ids
        if self._references is not None:
            tokens, reference_ids = self._references
            hidden_states, ids = torch.cat([latents, tokens], dim=1), torch.cat([ids, reference_ids])
        prediction = self.call_transformer(
            transformer, hidden_states.to(self.dtype), timestep, condition, guidance=self._guidance, img_ids=ids
        )
        return prediction[:, : latents.shape[1]]  # the noisy image's tokens

    def decode(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        height, width = self._size
        latents = latents.transpose(1, 2).reshape(latents.shape[0], -1, height, width)  # (B, C, h, w)
        mean, std = self._latent_statistics(latents)
        latents = _unpatchify(latents * std + mean)
        return to_unit_range(self.vae.decode(latents.to(self.vae.device), return_dict=False)[0])


class Flux2KleinImagePipeline(Flux2ImagePipeline):
    """FLUX.2 [klein] (4B, 9B; distilled or base): Qwen3 text encoder, no guidance embedding; the base models
    run CFG with an empty negative prompt."""

    diffusers_class_name: ClassVar[str] = "Flux2KleinPipeline"
    default_negative_prompt: ClassVar[str | None] = ""
    cfg_rule: ClassVar[str] = "CFG runs when guidance_scale > 1 on a non-distilled (base) model"
    max_images: ClassVar[int] = 4
    # diffusers' default for the class (a folder's model_index.json may say otherwise).
    default_is_distilled: ClassVar[bool] = False

    def __init__(self, *args: Any, is_distilled: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if is_distilled is not None and not isinstance(is_distilled, bool):
            raise TypeError(f"is_distilled must be True, False or None, got {is_distilled!r}")
        self.is_distilled = self.default_is_distilled if is_distilled is None else is_distilled

    @classmethod
    def folder_settings(cls, path: Path) -> dict[str, Any]:
        """Whether the checkpoint is step-distilled, from `model_index.json` (`is_distilled`)."""
        from .loading import read_model_index

        value = read_model_index(path).get("is_distilled")
        return {"is_distilled": None if value is None else bool(value)}

    def uses_cfg(self, params: SamplingParams) -> bool:
        return params.guidance_scale > 1 and not self.is_distilled

    def ignored_settings(self, params: SamplingParams) -> dict[str, str]:
        ignored = super().ignored_settings(params)
        if params.guidance_scale > 1 and self.is_distilled:
            ignored["guidance_scale"] = "this FLUX.2 [klein] checkpoint is step-distilled: it runs without guidance"
        return ignored

    def _guidance_for(self, params: SamplingParams, batch: int) -> torch.Tensor | None:
        return None


class Flux2KleinKVImagePipeline(Flux2KleinImagePipeline):
    """FLUX.2 [klein] KV: the reference tokens are computed once, at the first step, whose transformer call
    also returns their keys and values per layer; later steps carry only the noisy image and read them."""

    diffusers_class_name: ClassVar[str] = "Flux2KleinKVPipeline"
    default_is_distilled: ClassVar[bool] = True

    def text_helper(self) -> Any:
        """klein's prompt encoding (the KV pipeline's is the same): diffusers' KV pipeline cannot be built without
        a transformer, whose attention its constructor rewires."""
        if self._text_helper is None:
            import diffusers

            self._text_helper = diffusers.Flux2KleinPipeline(
                transformer=None, vae=None, scheduler=None, **self.text_components
            )
        return self._text_helper

    def check_params(self, params: SamplingParams) -> None:
        super().check_params(params)
        if not self.is_distilled:
            raise ValueError("the KV-cache pipeline runs without CFG: it is for the step-distilled klein checkpoints")

    def prepare_latents(
        self, batch: int, params: SamplingParams, generator: torch.Generator, image: Any = None
    ) -> torch.Tensor:
        self._kv_cache = None
        return super().prepare_latents(batch, params, generator, image)

    def predict(
        self, transformer: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor, condition: Conditioning
    ) -> torch.Tensor:
        timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
        if self._references is None:
            return self.call_transformer(
                transformer, latents.to(self.dtype), timestep, condition, guidance=None, img_ids=self._image_ids
            )
        if self._kv_cache is None:
            # The first step: reference tokens first, then the noisy image's.
            tokens, reference_ids = self._references
            prediction, self._kv_cache = transformer(
                hidden_states=torch.cat([tokens, latents], dim=1).to(self.dtype),
                timestep=timestep,
                guidance=None,
                img_ids=torch.cat([reference_ids, self._image_ids]),
                kv_cache_mode="extract",
                num_ref_tokens=tokens.shape[1],
                return_dict=False,
                **condition.tensors,
            )
            return prediction
        return self.call_transformer(
            transformer,
            latents.to(self.dtype),
            timestep,
            condition,
            guidance=None,
            img_ids=self._image_ids,
            kv_cache=self._kv_cache,
            kv_cache_mode="cached",
        )

    def decode(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        self._kv_cache = None  # the reference keys and values are no longer needed
        return super().decode(latents, params)
