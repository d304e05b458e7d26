"""The offline demo pipelines: pixel-space digit generators of the native Flux and Wan architectures.

The shipped models (`demo_models/flux-digits`, `demo_models/wan-digits`, zoo entries of the same names)
generate 16x16 grey digits directly in pixel space: the "VAE" is the identity and the latents are the
pixels (B, 1, F=1, H, W) in [-1, 1]. Prompts go through `DigitTextEncoder` (a word-level encoder that needs
no download). Everything else is the shared pipeline: our denoising loop with each step and CFG branch
told to the transformer, separate positive and negative calls, the result dataclass.

Guidance is classifier-free guidance, `pred = neg + guidance_scale * (pos - neg)`, with the empty prompt
as the negative (the unconditional prediction, learnt by condition dropout); `guidance_scale` 1 runs the
positive branch alone. The schedule is flow-matching Euler with a static shift (diffusers'
`FlowMatchEulerDiscreteScheduler` levels, computed here so that the demo needs no diffusers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..demo import DigitTextEncoder
from ..models import FluxTransformer2DModel, WanTransformer3DModel
from ..params import SamplingParams
from .base import Conditioning, Pipeline
from .shared import flux_image_ids, pack_2x2, unpack_2x2

__all__ = ["DigitPipeline", "FlowMatchEuler", "FluxDigitsPipeline", "WanDigitsPipeline", "flow_sigmas", "predict_flow"]

# The training schedule's number of steps; the lowest noise level is the shifted 1 / this.
_TRAIN_STEPS = 1000


def flow_sigmas(num_inference_steps: int, shift: float = 1.0) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler's noise levels (static shift): N values from 1 down, then 0."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    if isinstance(shift, bool) or not isinstance(shift, int | float) or not shift > 0:
        raise ValueError(f"shift must be a number > 0, got {shift!r}")

    def shifted(sigma: np.ndarray | float) -> np.ndarray | float:
        return shift * sigma / (1 + (shift - 1) * sigma)

    # The scheduler's lowest level is the shifted 1/1000 of its training steps, and it shifts the
    # spaced levels once more: both shifts are part of its schedule.
    spaced = np.linspace(1.0, shifted(1.0 / _TRAIN_STEPS), num_inference_steps)
    sigmas = torch.from_numpy(shifted(spaced)).float()
    return torch.cat([sigmas, torch.zeros(1)])  # (N + 1,)


class FlowMatchEuler:
    """Euler steps of a rectified flow over `flow_sigmas`: x <- x + (sigma_next - sigma) * velocity.

    Its timesteps are the noise levels themselves (in [0, 1]); a fresh instance serves one generation.
    """

    def __init__(self, shift: float = 1.0) -> None:
        flow_sigmas(1, shift)  # validates shift
        self.shift = float(shift)
        self.sigmas = torch.zeros(1)
        self._index = 0

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
        self.sigmas = flow_sigmas(num_inference_steps, self.shift).to(device)
        self._index = 0
        return self.sigmas[:-1]

    def step(self, velocity: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        if self._index >= len(self.sigmas) - 1:
            raise RuntimeError(f"all {len(self.sigmas) - 1} steps are done: call set_timesteps for a new generation")
        sigma, sigma_next = self.sigmas[self._index], self.sigmas[self._index + 1]
        self._index += 1
        # The update in float32, as diffusers' scheduler does, so low-precision models do not drift.
        return (latents.float() + (sigma_next - sigma) * velocity.float()).to(latents.dtype)


def predict_flow(
    transformer: FluxTransformer2DModel | WanTransformer3DModel,
    pixels: torch.Tensor,
    sigma: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor | None = None,
) -> torch.Tensor:
    """One transformer call on noisy pixels (B, C, F, H, W) at noise levels `sigma` (B,) -> the velocity
    noise - clean image (B, C, F, H, W), as Flux and Wan are trained. Also the training forward."""
    if pixels.ndim != 5:
        raise ValueError(f"pixels must have shape (B, C, F, H, W), got {tuple(pixels.shape)}")
    batch, _, frames, height, width = pixels.shape
    if isinstance(transformer, FluxTransformer2DModel):
        if frames != 1:
            raise ValueError(f"the Flux demo generates single images: pixels must have F = 1, got {frames}")
        if pooled_projections is None:
            raise ValueError("the Flux demo needs pooled_projections (the text encoder's pooled output)")
        # 2x2 pixel patches become tokens outside the transformer (its patch_size is 1), as in FLUX.1.
        tokens = pack_2x2(pixels[:, :, 0])  # (B, H/2 * W/2, C * 4)
        out = transformer(
            tokens,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=sigma.expand(batch),  # Flux scales sigma by 1000 inside
            img_ids=flux_image_ids(height // 2, width // 2).to(pixels.device, pixels.dtype),
            txt_ids=torch.zeros(encoder_hidden_states.shape[1], 3, device=pixels.device, dtype=pixels.dtype),
            return_dict=False,
        )[0]
        return unpack_2x2(out, height, width).unsqueeze(2)  # (B, C, 1, H, W)
    if isinstance(transformer, WanTransformer3DModel):
        return transformer(pixels, sigma.expand(batch) * _TRAIN_STEPS, encoder_hidden_states, return_dict=False)[0]
    raise TypeError(f"transformer must be a FluxTransformer2DModel or WanTransformer3DModel, got {type(transformer)}")


class DigitPipeline(Pipeline):
    """The pixel-space demo pipeline; a family subclass names its transformer class.

    `diffusers_class_name` is the `_class_name` of the demo folder's `model_index.json` (no diffusers
    pipeline of that name exists: the prompt encoding is `DigitTextEncoder`'s own).
    """

    text_component_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    sampling_extras: ClassVar[frozenset[str]] = frozenset({"flow_shift"})
    default_negative_prompt: ClassVar[str] = ""
    cfg_rule: ClassVar[str] = "CFG runs when guidance_scale is not 1"
    # `predict_flow` takes a noise level per sample: requests at different steps can share a batch.
    per_sample_timesteps: ClassVar[bool] = True

    def __init__(
        self,
        transformer: torch.nn.Module,
        scheduler: FlowMatchEuler | None = None,
        vae: Any = None,
        zoo_entry: Any = None,
        text_encoder: DigitTextEncoder | None = None,
    ) -> None:
        if not isinstance(text_encoder, DigitTextEncoder):
            raise TypeError(f"text_encoder must be a DigitTextEncoder, got {type(text_encoder).__name__}")
        if vae is not None:
            raise TypeError(f"the demo works in pixel space: vae must be None, got {type(vae).__name__}")
        super().__init__(transformer, scheduler or FlowMatchEuler(), None, zoo_entry, text_encoder=text_encoder)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        torch_dtype: torch.dtype | str | None = None,
        device: str | torch.device = "cpu",
        zoo_entry: Any = None,
    ) -> DigitPipeline:
        """Load `transformer/` and `text_encoder/` of a demo folder with the checked loader of the weights
        package (every key and shape verified before any tensor is read)."""
        from ..weights import load_transformer
        from .loading import resolve_device

        device = resolve_device(device)
        transformer = load_transformer(path, cls.transformer_class, "transformer", torch_dtype, device)
        text_encoder = load_transformer(path, DigitTextEncoder, "text_encoder", torch_dtype, device)
        return cls(transformer, zoo_entry=zoo_entry, text_encoder=text_encoder)

    @property
    def text_encoder(self) -> DigitTextEncoder:
        return self.text_components["text_encoder"]

    def pixel_channels(self) -> int:
        raise NotImplementedError

    def vae_scale_factor(self) -> int:
        return 1

    def size_multiple(self) -> int:
        return 2

    def encode_prompt(self, prompts: list[str], params: SamplingParams) -> Conditioning:
        hidden, pooled = self.text_encoder.encode(prompts)  # (B, L, D), (B, D') or None
        tensors = {"encoder_hidden_states": hidden.to(self.dtype)}
        if pooled is not None:
            tensors["pooled_projections"] = pooled.to(self.dtype)
        return Conditioning(tensors)

    def uses_cfg(self, params: SamplingParams) -> bool:
        return params.guidance_scale != 1

    def check_params(self, params: SamplingParams) -> None:
        super().check_params(params)
        if params.guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1 for the demo (1 turns CFG off), got {params.guidance_scale}")

    def prepare_latents(self, batch: int, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
        shape = (batch, self.pixel_channels(), params.num_frames, params.height, params.width)
        return torch.randn(shape, generator=generator).to(self.device, self.dtype)  # (B, C, F, H, W)

    def make_scheduler(self, params: SamplingParams) -> FlowMatchEuler:
        return FlowMatchEuler(params.flow_shift if params.flow_shift is not None else self.scheduler.shift)

    def make_timesteps(self, scheduler: FlowMatchEuler, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        return scheduler.set_timesteps(params.num_inference_steps, device=self.device)

    def predict(
        self, transformer: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor, condition: Conditioning
    ) -> torch.Tensor:
        return predict_flow(transformer, latents, t.to(latents.dtype), **condition.tensors)

    def step_latents(
        self, scheduler: FlowMatchEuler, prediction: torch.Tensor, t: torch.Tensor, latents: torch.Tensor
    ) -> torch.Tensor:
        return scheduler.step(prediction, latents)

    def decode(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        grey = (latents[:, :, 0].float().clamp(-1, 1) + 1) / 2  # (B, 1, H, W) in [0, 1]
        return grey.expand(-1, 3, -1, -1)  # (B, 3, H, W)


class FluxDigitsPipeline(DigitPipeline):
    """The Flux-architecture digit model: 2x2 pixel patches packed into tokens, a pooled text embedding."""

    family: ClassVar[str] = "flux"
    diffusers_class_name: ClassVar[str] = "FluxDigitsPipeline"
    transformer_class: ClassVar[type] = FluxTransformer2DModel

    def pixel_channels(self) -> int:
        return self.transformer.config.in_channels // 4


class WanDigitsPipeline(DigitPipeline):
    """The Wan-architecture digit model: one-frame "videos", 1x2x2 patches inside the transformer."""

    family: ClassVar[str] = "wan"
    diffusers_class_name: ClassVar[str] = "WanDigitsPipeline"
    transformer_class: ClassVar[type] = WanTransformer3DModel

    def pixel_channels(self) -> int:
        return self.transformer.config.in_channels

    def size_multiple(self) -> int:
        _, patch_height, patch_width = self.transformer.config.patch_size
        return int(np.lcm(patch_height, patch_width))
