"""Helpers the family pipelines share: latent packing, the flow-matching shift, true-CFG checks and the
VAE output range. A family pipeline imports these from here, never from another family's file."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..params import SamplingParams

if TYPE_CHECKING:
    from .base import Pipeline

__all__ = [
    "HunyuanVideoVAESizes",
    "check_frame_count",
    "check_true_cfg",
    "flow_match_mu",
    "flux_image_ids",
    "image_input",
    "negative_prompt_cfg",
    "pack_2x2",
    "refuse_unknown_inputs",
    "to_unit_range",
    "unpack_2x2",
    "unpaired_guidance_scale",
    "unpaired_true_cfg",
    "video_frames_to_unit_range",
]


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


def negative_prompt_cfg(params: SamplingParams) -> bool:
    """Whether CFG runs where `guidance_scale` is a true CFG scale that needs a negative prompt (Qwen-Image's
    pipelines): scale above 1 and a negative prompt given."""
    return params.guidance_scale > 1 and params.negative_prompt is not None


def unpaired_guidance_scale(params: SamplingParams, rule: str) -> dict[str, str]:
    """A `guidance_scale` > 1 that is a true CFG scale without a negative prompt does nothing (Qwen-Image's
    pipelines)."""
    if params.guidance_scale > 1 and params.negative_prompt is None:
        return {"guidance_scale": f"it is the CFG scale and needs a negative prompt ({rule})"}
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


def flux_image_ids(height: int, width: int) -> torch.Tensor:
    """(H * W, 3) position ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """VAE output in [-1, 1] -> [0, 1], clamped (diffusers' `postprocess(output_type="pt")`)."""
    return (pixels / 2 + 0.5).clamp(0, 1)


def video_frames_to_unit_range(video: torch.Tensor) -> torch.Tensor:
    """VAE output (B, 3, F, H, W) in [-1, 1] -> frames (B, F, 3, H, W) in [0, 1]."""
    return to_unit_range(video).permute(0, 2, 1, 3, 4)


def check_frame_count(num_frames: int, factor: int, family: str) -> None:
    """A causal video VAE decodes F latent frames into (F - 1) * factor + 1 frames: other counts cannot
    come back, so they are refused with the two nearest that can."""
    if num_frames % factor != 1:
        lower = max(1, (num_frames - 1) // factor * factor + 1)
        raise ValueError(
            f"num_frames must be of the form {factor}k+1 for {family} (its VAE compresses {factor} frames into "
            f"one latent frame after the first), got {num_frames}; try {lower} or {lower + factor}"
        )


def refuse_unknown_inputs(pipeline: Pipeline, inputs: dict[str, Any], allowed: str, takes: tuple[str, ...]) -> None:
    """A call keyword outside `takes` is a TypeError naming it and `allowed` (what the call takes, in words), and
    saying that diffusers' prompt embeddings and latents have no place here (the pipeline's
    `_refuse_diffusers_keywords` has already placed the sampling settings and the generator)."""
    unknown = sorted(set(inputs) - set(takes))
    if unknown:
        raise TypeError(
            f"{type(pipeline).__name__} takes {allowed}, got {unknown}; prompt embeddings and latents are not "
            "inputs: the pipeline encodes the prompts and draws the noise from SamplingParams.seed"
        )


def image_input(pipeline: Pipeline, inputs: dict[str, Any]) -> Any:
    """The `image=` of a call, None when not given: a keyword other than it and the pipeline's `call_inputs` is
    refused, and an image-to-video pipeline (`takes_image() == "required"`) refuses a call without one."""
    takes = ("image", *pipeline.call_inputs)
    refuse_unknown_inputs(pipeline, inputs, "only " + ", ".join(f"{key}=..." for key in takes), takes)
    image = inputs.get("image")
    if image is None and pipeline.takes_image() == "required":
        raise ValueError(f"{type(pipeline).__name__} is image-to-video: pass image=<first frame>")
    return image


class HunyuanVideoVAESizes:
    """Latent sizes of a pipeline on HunyuanVideo's causal video VAE (HunyuanVideo and HunyuanVideo-1.5)."""

    def vae_scale_factor(self) -> int:
        return self.vae.config.spatial_compression_ratio

    def temporal_scale_factor(self) -> int:
        return self.vae.config.temporal_compression_ratio

    def size_multiple(self) -> int:
        return self.vae_scale_factor() * self.transformer.config.patch_size
