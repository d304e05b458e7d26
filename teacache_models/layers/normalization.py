"""Adaptive LayerNorm pieces (AdaLN-Zero and continuous AdaLN) shared by the DiT families."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AdaLayerNormContinuous",
    "AdaLayerNormZero",
    "AdaLayerNormZeroSingle",
    "FP32LayerNorm",
    "RMSNorm",
    "modulate",
]


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
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(conditioning_embedding_dim, 2 * embedding_dim, bias=bias)
        self.norm = nn.LayerNorm(embedding_dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        # The conditioning may arrive in float32 while the tokens are in half precision.
        scale, shift = self.linear(self.silu(conditioning).to(x.dtype)).chunk(2, dim=1)
        return modulate(self.norm(x), shift, scale)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype, returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm whose statistics are taken in float32.

    With a weight, the normalised tokens are cast to the weight's dtype when that is half precision and
    otherwise stay in the promoted dtype (float32 for half inputs with a float32 weight: the behaviour
    the diffusers checkpoints were validated with). Without a weight, the input dtype is returned.
    """

    def __init__(self, dim: int, eps: float, elementwise_affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        normed = x * torch.rsqrt(variance + self.eps)
        if self.weight is None:
            return normed.to(x.dtype)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            normed = normed.to(self.weight.dtype)
        return normed * self.weight
