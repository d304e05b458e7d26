"""Qwen-Image-Edit and Qwen-Image-Edit-2509: instruction editing of one or several input images.

The input images condition the generation twice: the Qwen2.5-VL text encoder reads them with the
instruction (a chat template with image placeholders), and their VAE latents are appended to the noise
tokens, so the transformer attends to them at every step (`img_shapes` lists the generated image first,
then each input image); only the generated image's tokens are denoised. Guidance, schedule and decoding
are Qwen-Image's (true CFG with norm rescaling).

As in diffusers, each input image is resized to about `vae_image_area` pixels (its aspect ratio kept,
sides multiples of 32) before the VAE; Edit-2509 also resizes it to about `condition_image_area` pixels for
the vision tower, where Edit gives the vision tower the VAE-sized image, or, as diffusers does, an image passed
in a list at its own size. The output size is
`SamplingParams.height` x `width`; `output_size(images)` is the reference's default, the VAE size of the
(last) input image.

diffusers' pipelines generate one prompt per call; here each prompt of a batch is encoded on its own with
the same images (the reference's encoding of that prompt) and the batch denoises together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..params import SamplingParams
from .base import Conditioning
from .qwen_image import QwenImageTextToImagePipeline
from .shared import pack_2x2, refuse_unknown_inputs

__all__ = ["EditImages", "QwenImageEditPipeline", "QwenImageEditPlusPipeline", "check_edit_images", "edit_image_size"]

# The pixel areas diffusers resizes the input images to (its module constants; Edit-2509's vision-tower size).
VAE_IMAGE_AREA = 1024 * 1024
CONDITION_IMAGE_AREA = 384 * 384


def edit_image_size(area: int, aspect_ratio: float) -> tuple[int, int]:
    """(width, height) of about `area` pixels at `aspect_ratio` (width / height), each rounded to a multiple of 32
    (Python's rounding, half to even, as the reference)."""
    width = math.sqrt(area * aspect_ratio)
    height = width / aspect_ratio
    return round(width / 32) * 32, round(height / 32) * 32


def resized_image_size(image: Any, area: int, index: int) -> tuple[int, int]:
    """`edit_image_size` of input image `image[index]`; an aspect ratio so far from square that a side rounds to 0 is
    refused (the reference fails inside its image processor)."""
    width, height = edit_image_size(area, image.width / image.height)
    if min(width, height) == 0:
        raise ValueError(
            f"image[{index}] of {image.width} x {image.height} pixels is too narrow: resized to about {area} pixels at "
            f"its aspect ratio (sides multiples of 32) it would be {width} x {height}; crop it closer to square"
        )
    return width, height


@dataclass
class EditImages:
    """The input images of one call, prepared: what the vision tower reads, and the VAE's pixels."""

    condition: list[Any]  # PIL images for the text encoder's processor
    pixels: list[torch.Tensor]  # per image (1, 3, 1, H, W) in [-1, 1]
    sizes: list[tuple[int, int]]  # per image the VAE (width, height)


def check_edit_images(
    pipeline: QwenImageEditPipeline, inputs: dict[str, Any], extra: tuple[str, ...] = ()
) -> list[Any]:
    """`image=` (one PIL image, or a list of up to `max_images`) as a list of images in the pipeline's
    `image_mode`; a keyword other than `image` and `extra` is refused."""
    from PIL import Image

    name = type(pipeline).__name__
    allowed = ", ".join(f"{key}=..." for key in ("image", *extra))
    refuse_unknown_inputs(pipeline, inputs, f"only {allowed}", ("image", *extra))
    image = inputs.get("image")
    if image is None:
        raise ValueError(
            f"{name} edits an input image: pass image=<PIL image> (or a list of up to {pipeline.max_images})"
        )
    images = list(image) if isinstance(image, list | tuple) else [image]
    if not 1 <= len(images) <= pipeline.max_images:
        raise ValueError(f"{name} takes 1 to {pipeline.max_images} input images, got {len(images)}")
    for index, item in enumerate(images):
        if not isinstance(item, Image.Image):
            raise TypeError(f"image[{index}] must be a PIL image (the reference's processors read PIL), got {item!r}")
        if item.width < 1 or item.height < 1:
            raise ValueError(f"image[{index}] must have at least one pixel, got size {item.size}")
    return [item.convert(pipeline.image_mode) for item in images]


class QwenImageEditPipeline(QwenImageTextToImagePipeline):
    """Qwen-Image-Edit: one input image, read by the vision tower and appended as VAE latents."""

    diffusers_class_name: ClassVar[str] = "QwenImageEditPipeline"
    text_component_names: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer", "processor")
    max_images: ClassVar[int] = 1
    image_mode: ClassVar[str] = "RGB"  # what the VAE reads
    # Instance attributes, so that a test can run the reference's code path at a small size.
    vae_image_area: int = VAE_IMAGE_AREA
    condition_image_area: int | None = None  # None: the vision tower reads the VAE-sized image

    def takes_image(self) -> str:
        return "required"

    def output_size(self, image: Any) -> tuple[int, int]:
        """(height, width) the reference generates at when given none: the VAE size of the last input image."""
        images = list(image) if isinstance(image, list | tuple) else [image]
        width, height = resized_image_size(images[-1], self.vae_image_area, len(images) - 1)
        multiple = self.size_multiple()
        return height // multiple * multiple, width // multiple * multiple

    def check_inputs(self, params: SamplingParams, **inputs: Any) -> None:
        # The text encoding reads the images, and it runs before the latents are prepared: prepared here once.
        given_list = isinstance(inputs.get("image"), list | tuple)
        self._images = self._prepare_images(check_edit_images(self, inputs), given_list)

    def _prepare_images(self, images: list[Any], given_list: bool = False) -> EditImages:
        """`given_list`: `image=` was a list. The reference's Edit pipeline resizes a bare image for the vision tower
        but hands a list to it as given (its resize leaves a list alone), so an image in a list reaches the vision
        tower at its own size; the VAE reads the resized image either way."""
        processor = self._image_processor()
        condition, pixels, sizes = [], [], []
        for index, image in enumerate(images):
            width, height = resized_image_size(image, self.vae_image_area, index)
            sizes.append((width, height))
            if self.condition_image_area is None:
                if not given_list:
                    image = processor.resize(image, height, width)
                condition.append(image)
            else:
                small_width, small_height = resized_image_size(image, self.condition_image_area, index)
                condition.append(processor.resize(image, small_height, small_width))
            pixels.append(processor.preprocess(image, height, width).unsqueeze(2))  # (1, 3, 1, H, W)
        return EditImages(condition, pixels, sizes)

    def _image_processor(self) -> Any:
        from diffusers.image_processor import VaeImageProcessor

        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor() * 2)

    def encode_prompt(self, prompts: list[str], params: SamplingParams) -> Conditioning:
        """Each prompt encoded with the images by the reference, then padded to one length (mask 0 on padding)."""
        helper = self.text_helper()
        images = self._images.condition
        image = images if self.condition_image_area is not None else images[0]
        encoded = [
            helper.encode_prompt(
                prompt=[prompt], image=image, device=self.device, max_sequence_length=self.max_sequence_length
            )
            for prompt in prompts
        ]
        if len(encoded) == 1:
            embeds, mask = encoded[0]
        else:
            length = max(e.shape[1] for e, _ in encoded)
            embeds = torch.cat([torch.nn.functional.pad(e, (0, 0, 0, length - e.shape[1])) for e, _ in encoded])
            masks = [torch.ones(e.shape[:2], dtype=torch.long, device=e.device) if m is None else m for e, m in encoded]
            mask = torch.cat([torch.nn.functional.pad(m, (0, length - m.shape[1])) for m in masks])
            mask = None if bool(mask.all()) else mask
        return Conditioning({"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask})

    def prepare_latents(
        self, batch: int, params: SamplingParams, generator: torch.Generator, image: Any = None
    ) -> torch.Tensor:
        # The input images' latents first (the VAE posterior's mode draws no noise), then the noise, as the
        # reference orders them.
        dtype = self.text_components["text_encoder"].dtype
        tokens = [self._encode_image(pixels.to(self.device, dtype), batch) for pixels in self._images.pixels]
        self._image_tokens = torch.cat(tokens, dim=1)  # (B, L_ref, C * 4)
        latents = super().prepare_latents(batch, params, generator)
        factor = self.vae_scale_factor() * 2
        references = [(1, height // factor, width // factor) for width, height in self._images.sizes]
        self._img_shapes = [[self._img_shapes[0][0], *references]] * batch
        return latents

    def _encode_image(self, pixels: torch.Tensor, batch: int) -> torch.Tensor:
        """Pixels (1, 3, 1, H, W) -> normalised, packed latents (B, H/16 * W/16, C * 4)."""
        latents = self.vae.encode(pixels).latent_dist.mode()  # (1, C, 1, h, w)
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
        latents = ((latents - mean) / std).repeat(batch, 1, 1, 1, 1)
        return pack_2x2(latents[:, :, 0])

    def transformer_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.cat([latents, self._image_tokens], dim=1)  # (B, L + L_ref, C * 4)


class QwenImageEditPlusPipeline(QwenImageEditPipeline):
    """Qwen-Image-Edit-2509: one to three input images, each read by the vision tower at about 384 x 384 pixels
    ("Picture i:" in the template) and appended as VAE latents."""

    diffusers_class_name: ClassVar[str] = "QwenImageEditPlusPipeline"
    max_images: ClassVar[int] = 3
    condition_image_area: int | None = CONDITION_IMAGE_AREA
