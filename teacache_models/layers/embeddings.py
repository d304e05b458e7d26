"""Timestep and condition embeddings shared by the diffusion transformers."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["MLPEmbedder", "timestep_sinusoids"]


def timestep_sinusoids(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal features of (fractional) timesteps, computed in float32.

    Args:
        timesteps: (N,) timesteps.
        dim: number of features; odd sizes are zero-padded.
        flip_sin_to_cos: put the cosines first (the DiT convention) instead of the sines.
        downscale_freq_shift: the frequency exponent is divided by `dim // 2 - downscale_freq_shift`.

    Returns:
        (N, dim) float32 features.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor, got shape {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    frequencies = torch.exp(exponent / (half - downscale_freq_shift))
    angles = scale * (timesteps[:, None].float() * frequencies[None, :])  # (N, half)
    sin, cos = torch.sin(angles), torch.cos(angles)
    features = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2 == 1:
        features = nn.functional.pad(features, (0, 1))
    return features


class MLPEmbedder(nn.Module):
    """Linear -> activation -> Linear: the timestep, guidance and pooled-text embedders.

    Attribute names (`linear_1`, `linear_2`) are those of the diffusers checkpoints.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        act: str = "silu",
        bias: bool = True,
    ) -> None:
        super().__init__()
        activations = {"silu": nn.SiLU, "gelu_tanh": lambda: nn.GELU(approximate="tanh")}
        if act not in activations:
            raise ValueError(f"act must be one of {sorted(activations)}, got {act!r}")
        self.linear_1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = activations[act]()
        self.linear_2 = nn.Linear(hidden_features, out_features or hidden_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))
