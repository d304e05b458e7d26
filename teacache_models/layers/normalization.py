"""Adaptive LayerNorm pieces (AdaLN-Zero and continuous AdaLN) shared by the DiT families."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AdaLayerNormContinuous", "AdaLayerNormZero", "AdaLayerNormZeroSingle", "modulate"]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift with per-sample (B, D) modulation on (B, L, D) tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLayerNormZero(nn.Module):
    """LayerNorm modulated by the conditioning, returning the gates of an AdaLN-Zero block.

    The projection of the conditioning is chunked as shift, scale, gate (attention) then shift, scale,
    gate (MLP).
    """

    def __init__(self, embedding_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(embedding_dim, 6 * embedding_dim)
        self.norm = nn.LayerNorm(embedding_dim, elementwise_affine=False, eps=eps)

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, D) tokens, (B, D) conditioning -> modulated tokens, gate_msa, shift_mlp, scale_mlp, gate_mlp."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.linear(self.silu(emb)).chunk(6, dim=1)
        return modulate(self.norm(x), shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroSingle(nn.Module):
    """AdaLN-Zero for single-stream blocks: shift, scale and one gate."""

    def __init__(self, embedding_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(embedding_dim, 3 * embedding_dim)
        self.norm = nn.LayerNorm(embedding_dim, elementwise_affine=False, eps=eps)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) tokens, (B, D) conditioning -> modulated tokens, gate."""
        shift, scale, gate = self.linear(self.silu(emb)).chunk(3, dim=1)
        return modulate(self.norm(x), shift, scale), gate


class AdaLayerNormContinuous(nn.Module):
    """The final AdaLN before the output projection; its projection is chunked scale first, then shift."""

    def __init__(
        self,
        embedding_dim: int,
        conditioning_embedding_dim: int,
        elementwise_affine: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(conditioning_embedding_dim, 2 * embedding_dim)
        self.norm = nn.LayerNorm(embedding_dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        # The conditioning may arrive in float32 while the tokens are in half precision.
        scale, shift = self.linear(self.silu(conditioning).to(x.dtype)).chunk(2, dim=1)
        return modulate(self.norm(x), shift, scale)
