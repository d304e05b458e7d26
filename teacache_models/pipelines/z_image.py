"""Z-Image text-to-image: its own CFG sign convention, optional CFG truncation and normalisation.

Guidance rule (as diffusers' ZImagePipeline): CFG runs when `guidance_scale > 0` (Turbo uses 0: one call
per step) with `pred = pos + g * (pos - neg)`, i.e. standard CFG at scale g + 1. `cfg_truncation`
drops CFG once the normalised time (1000 - t) / 1000 exceeds it; `cfg_normalization` caps the norm of
the guided prediction at that multiple of the positive prediction's norm (per sample). The transformer
is trained on time 1 - sigma and predicts the negated velocity, so the prediction is negated before
the scheduler step.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..models import ZImageTransformer2DModel
from ..params import SamplingParams
from .base import Conditioning, Pipeline
from .shared import flow_match_mu, to_unit_range

__all__ = ["ZImageTextToImagePipeline"]


class ZImageTextToImagePipeline(Pipeline):
    """Z-Image(-Turbo): Qwen3 text encoder (second-to-last hidden state, unpadded), 16-channel VAE."""

    family: ClassVar[str] = "z_image"
    diffusers_class_name: ClassVar[str] = "ZImagePipeline"
    transformer_class: ClassVar[type] = ZImageTransformer2DModel
    sampling_extras: ClassVar[frozenset[str]] = frozenset({"flow_shift", "cfg_truncation", "cfg_normalization"})
    default_negative_prompt: ClassVar[str | None] = ""
    cfg_rule: ClassVar[str] = "CFG runs when guidance_scale > 0"
    batches_cfg: ClassVar[bool] = True
    patch_size: ClassVar[int] = 2

    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def size_multiple(self) -> int:
        return self.vae_scale_factor() * self.patch_size

    def encode_prompt(self, prompts: list[str], params: SamplingParams) -> Conditioning:
        # A list per call: the reference fills its template into the list it is given.
        embeds, _ = self.text_helper().encode_prompt(
            prompt=list(prompts),
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning({"cap_feats": embeds})

    def uses_cfg(self, params: SamplingParams) -> bool:
        return params.guidance_scale > 0

    def ignored_settings(self, params: SamplingParams) -> dict[str, str]:
        ignored = super().ignored_settings(params)
        if not self.uses_cfg(params):
            for name in ("cfg_truncation", "cfg_normalization"):
                if getattr(params, name) is not None:
                    ignored[name] = f"it shapes CFG, which is off ({self.cfg_rule})"
        if params.flow_shift is not None and self.scheduler.config.get("use_dynamic_shifting", False):
            ignored["flow_shift"] = (
                "this scheduler derives its shift from the image size (use_dynamic_shifting=True in its config)"
            )
        return ignored

    def check_params(self, params: SamplingParams) -> None:
        super().check_params(params)
        # A dynamic-shifting scheduler never reads its `shift`, so the override would silently do nothing.
        reason = self.ignored_settings(params).get("flow_shift")
        if reason is not None:
            raise ValueError(f"flow_shift={params.flow_shift!r} has no effect: {reason}; leave it None")

    def prepare_latents(self, batch: int, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
        factor = self.vae_scale_factor()
        shape = (batch, self.transformer.in_channels, params.height // factor, params.width // factor)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)  # (B, C, H, W)

    def make_timesteps(self, scheduler: Any, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        steps = params.num_inference_steps
        sigmas = torch.linspace(1.0, 1 / steps, steps).tolist()
        mu = flow_match_mu((latents.shape[2] // 2) * (latents.shape[3] // 2), scheduler.config)
        scheduler.set_timesteps(steps, device=self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return scheduler.timesteps

    def cfg_at_step(self, step: int, t: torch.Tensor, params: SamplingParams) -> bool:
        if params.cfg_truncation is None:
            return True
        # The normalised time is computed in float32, as the reference does: in float64 a timestep that
        # lands on the threshold (t = 600 for 0.4) gives exactly 0.4 and keeps CFG, while its float32
        # value 0.40000001 lies above it and drops CFG.
        normalised = ((1000 - t.float()) / 1000).item()
        return normalised <= params.cfg_truncation

    def predict(
        self, transformer: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor, condition: Conditioning
    ) -> torch.Tensor:
        batch = latents.shape[0]
        time = (1000 - t.expand(batch)) / 1000
        samples = list(latents.to(self.dtype).unsqueeze(2).unbind(0))  # B x (C, 1, H, W)
        outputs = transformer(samples, time, condition.tensors["cap_feats"], return_dict=False)[0]
        return torch.stack([o.float() for o in outputs]).squeeze(2)  # (B, C, H, W)

    def predict_both(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        t: torch.Tensor,
        condition: Conditioning,
        negative: Conditioning,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The reference's layout: the latents twice, the positive captions then the negative ones (each sample's
        # own length: the transformer pads the batch to its longest caption).
        both = Conditioning({"cap_feats": [*condition.tensors["cap_feats"], *negative.tensors["cap_feats"]]})
        positive, negative_prediction = self.predict(transformer, latents.repeat(2, 1, 1, 1), t, both).chunk(2)
        return positive, negative_prediction

    def guide(
        self, positive: torch.Tensor, negative: torch.Tensor | None, step: int, t: torch.Tensor, params: SamplingParams
    ) -> torch.Tensor:
        if negative is None:
            return -positive
        guided = []
        for pos, neg in zip(positive, negative, strict=True):
            prediction = pos + params.guidance_scale * (pos - neg)
            if params.cfg_normalization is not None:
                limit = torch.linalg.vector_norm(pos) * params.cfg_normalization
                norm = torch.linalg.vector_norm(prediction)
                if norm > limit:
                    prediction = prediction * (limit / norm)
            guided.append(prediction)
        return -torch.stack(guided)

    def step_latents(self, scheduler: Any, prediction: torch.Tensor, t: torch.Tensor, latents: torch.Tensor):
        return scheduler.step(prediction.float(), t, latents, return_dict=False)[0]

    def decode(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return to_unit_range(self.vae.decode(latents, return_dict=False)[0])
