"""Attention on (batch, tokens, heads, head_dim) tensors through PyTorch's fused kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiHeadAttentionBase", "attention"]


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head attention.

    Args:
        query, key, value: (B, L, H, D) tensors (key and value may have another length L').
        attn_mask: optional boolean or additive mask broadcastable to (B, H, L, L').

    Returns:
        (B, L, H * D), in the dtype of `query`.
    """
    # (B, L, H, D) -> (B, H, L, D): the layout scaled_dot_product_attention expects.
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attn_mask
    )
    return out.transpose(1, 2).flatten(2, 3).to(query.dtype)  # (B, L, H * D)


class MultiHeadAttentionBase(nn.Module):
    """Base of the attention modules: `num_heads` heads of `head_dim` channels (`inner_dim` in all), and
    `project_heads`, which projects tokens to heads."""

    def __init__(self, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.inner_dim = num_heads * head_dim

    def project_heads(self, projection: nn.Module, norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) tokens -> (B, L, H, Dh): `projection(x)` split into heads, then `norm` per head if given."""
        heads = projection(x).unflatten(-1, (-1, self.head_dim))
        return heads if norm is None else norm(heads)
