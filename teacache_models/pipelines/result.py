"""What a generation returns (`PipelineResult`), a CFG branch's text conditioning (`Conditioning`), and the checks
and records the denoising loop ends with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..cache import TeaCacheStats
from ..cache.state import BranchStats
from ..params import SamplingParams

__all__ = ["Conditioning", "PipelineResult", "check_finite_latents", "merge_stats"]


@dataclass
class Conditioning:
    """One CFG branch's text conditioning, as the family's transformer call reads it."""

    tensors: dict[str, Any]


@dataclass
class PipelineResult:
    """What one generation produced and how.

    `images` is (B, 3, H, W) for image models (a layered model's: (B, layers, 4, H, W), RGBA) and `frames`
    (B, F, 3, H, W) for video models, float32 in [0, 1] on the CPU; the other is None. `prompt` holds the prompts
    encoded (a layered model's blank ones replaced by its caption of the input image). `timings` holds seconds
    per stage (`text_encoding`, `denoising`, `decoding`, `total`). `teacache_stats` records which steps each CFG
    branch computed and skipped; for a model with several transformers (Wan2.2's experts) it joins them, and
    `expert_stats` holds each one's own record by component name (empty for one transformer).
    """

    images: torch.Tensor | None
    frames: torch.Tensor | None
    seed: int
    sampling_params: SamplingParams
    timings: dict[str, float]
    teacache_stats: TeaCacheStats
    prompt: list[str] = field(default_factory=list)
    expert_stats: dict[str, TeaCacheStats] = field(default_factory=dict)

    @property
    def is_video(self) -> bool:
        return self.frames is not None

    @property
    def is_layered(self) -> bool:
        """Whether `images` holds RGBA layers per sample, (B, layers, 4, H, W)."""
        return self.images is not None and self.images.ndim == 5

    def to_uint8(self) -> torch.Tensor:
        """(B, H, W, 3) or (B, F, H, W, 3) uint8: what an image or video file stores."""
        pixels = self.frames if self.frames is not None else self.images
        pixels = (pixels * 255).round().clamp(0, 255).to(torch.uint8)
        return pixels.movedim(-3, -1)

    def summary(self) -> str:
        """One line: steps computed and skipped per CFG branch, and the wall time."""
        return f"{self.teacache_stats.summary()}; wall time {self.timings['total']:.2f} s (seed {self.seed})"


def check_finite_latents(latents: torch.Tensor, params: SamplingParams, dtype: torch.dtype) -> None:
    """Denoised latents holding NaN or inf would decode to a black or garbled image: an error naming the settings
    that scale the prediction, instead of a silently wrong output."""
    if torch.isfinite(latents).all():
        return
    scales = {"guidance_scale": params.guidance_scale, **params.extras()}
    remedy = "lower the guidance scale" + (", or load the model in float32" if dtype != torch.float32 else "")
    raise ValueError(
        f"the generation produced non-finite latents (NaN or inf), so no image is returned: the prediction "
        f"overflowed {dtype} with {scales}; {remedy}, or check that the weights hold finite values"
    )


def merge_stats(all_stats: Sequence[TeaCacheStats]) -> TeaCacheStats:
    """One record for several transformers (Wan2.2's experts): their steps together, per branch."""
    if len(all_stats) == 1:
        return all_stats[0]
    first = all_stats[0]

    def join(branch: str) -> BranchStats:
        computed = sorted(s for stats in all_stats for s in getattr(stats, branch).computed_steps)
        skipped = sorted(s for stats in all_stats for s in getattr(stats, branch).skipped_steps)
        return BranchStats(tuple(computed), tuple(skipped))

    reasons = [s.disabled_reason for s in all_stats if s.disabled_reason]
    return TeaCacheStats(
        enabled=any(s.enabled for s in all_stats),
        teacache_thresh=first.teacache_thresh,
        num_inference_steps=first.num_inference_steps,
        positive=join("positive"),
        negative=join("negative"),
        disabled_reason="; ".join(reasons) or None,
    )
