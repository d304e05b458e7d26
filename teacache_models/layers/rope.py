"""Rotary position embeddings (RoPE) in the real cos/sin form."""

from __future__ import annotations

import torch

__all__ = ["apply_rotary_complex", "apply_rotary_interleaved", "rope_cos_sin"]


def rope_cos_sin(
    dim: int, positions: torch.Tensor, theta: float, freqs_dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of one RoPE axis, each frequency repeated for its (even, odd) channel pair.

    Args:
        dim: channels of this axis (even).
        positions: (L,) positions, possibly fractional.
        theta: the RoPE base.
        freqs_dtype: precision of the angle computation (Flux computes in float64).

    Returns:
        cos, sin: (L, dim) float32.
    """
    if dim % 2:
        raise ValueError(f"a RoPE axis needs an even number of channels, got {dim}")
    if positions.device.type == "mps" and freqs_dtype == torch.float64:
        freqs_dtype = torch.float32  # MPS has no float64
    exponents = torch.arange(0, dim, 2, dtype=freqs_dtype, device=positions.device) / dim
    frequencies = 1.0 / (theta**exponents)  # (dim / 2,)
    angles = torch.outer(positions.to(freqs_dtype), frequencies)  # (L, dim / 2)
    cos = angles.cos().repeat_interleave(2, dim=1).float()
    sin = angles.sin().repeat_interleave(2, dim=1).float()
    return cos, sin


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i + 1) of (B, L, H, D) tokens by per-token angles, in float32.

    Args:
        x: (B, L, H, D) queries or keys.
        cos, sin: (L, D) from `rope_cos_sin` (one row per token).
    """
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, L, 1, D)
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, H, D / 2) each
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)  # (B, L, H, D)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def apply_rotary_complex(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of (B, L, H, D) tokens by complex factors, in float32.

    Args:
        x: (B, L, H, D) queries or keys.
        freqs_cis: complex (L, D / 2) or (B, L, D / 2) unit factors.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, L, H, D / 2)
    factors = freqs_cis.unsqueeze(-2)  # broadcast over heads
    return torch.view_as_real(pairs * factors).flatten(3).to(x.dtype)
