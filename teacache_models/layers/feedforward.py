"""The transformer MLP, laid out as the diffusers checkpoints store it (`net.0.proj`, `net.2`)."""

from __future__ import annotations

import torch
from torch import nn

from .linear import linear_activation

__all__ = ["FeedForward"]

# diffusers' activation names -> those of `linear_activation`.
_GELU_ACTIVATIONS = {"gelu": "gelu", "gelu-approximate": "gelu_tanh"}


class _GELUProjection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, activation: str, bias: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_activation(self.proj, x, self.activation)


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear.

    Args:
        dim: input width.
        dim_out: output width (default `dim`).
        mult: hidden width as a multiple of `dim`, unless `inner_dim` is given.
        activation_fn: "gelu" or "gelu-approximate" (tanh approximation).
    """

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        mult: float = 4,
        activation_fn: str = "gelu-approximate",
        inner_dim: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if activation_fn not in _GELU_ACTIVATIONS:
            raise ValueError(f"activation_fn must be one of {sorted(_GELU_ACTIVATIONS)}, got {activation_fn!r}")
        inner_dim = inner_dim or int(dim * mult)
        # Index 1 holds no weights (dropout at training time); keeping it preserves the key `net.2`.
        self.net = nn.ModuleList(
            [
                _GELUProjection(dim, inner_dim, _GELU_ACTIVATIONS[activation_fn], bias),
                nn.Identity(),
                nn.Linear(inner_dim, dim_out or dim, bias=bias),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            x = module(x)
        return x
