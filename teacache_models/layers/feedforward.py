"""The transformer MLP, laid out as the diffusers checkpoints store it (`net.0.proj`, `net.2`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeedForward"]

_GELU_APPROXIMATIONS = {"gelu": "none", "gelu-approximate": "tanh"}


class _GELUProjection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, approximate: str, bias: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


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
        if activation_fn not in _GELU_APPROXIMATIONS:
            raise ValueError(f"activation_fn must be one of {sorted(_GELU_APPROXIMATIONS)}, got {activation_fn!r}")
        inner_dim = inner_dim or int(dim * mult)
        # Index 1 holds no weights (dropout at training time); keeping it preserves the key `net.2`.
        self.net = nn.ModuleList(
            [
                _GELUProjection(dim, inner_dim, _GELU_APPROXIMATIONS[activation_fn], bias),
                nn.Identity(),
                nn.Linear(inner_dim, dim_out or dim, bias=bias),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            x = module(x)
        return x
