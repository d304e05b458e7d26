"""FLUX.1 (dev, schnell): the native transformer, with TeaCache on its block stack.

Architecture, parameter names and numerics follow diffusers' `FluxTransformer2DModel`: text and image
tokens are embedded separately, pass `num_layers` dual-stream blocks (text first in the joint
attention), then `num_single_layers` single-stream blocks over the joined sequence, and the image part
goes through the final AdaLN and projection. TeaCache skips both block stacks; its indicator is block
0's AdaLN-modulated image input.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..cache import Deferred, TeaCacheMixin
from ..checks import (
    batch_vector,
    check_attention_kwargs,
    check_dtype,
    check_guidance,
    check_rope_axes,
    check_tensor,
    check_tokens,
    controlnet_residuals,
)
from ..layers import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    AdaLayerNormZeroSingle,
    FeedForward,
    MLPEmbedder,
    MultiHeadAttentionBase,
    apply_rotary_interleaved,
    attention,
    clip_fp16,
    linear_activation,
    modulate,
    rope_cos_sin,
    timestep_sinusoids,
)
from ..lora import lora_scale_from
from .base import ConfiguredModel, Transformer2DModelOutput, register_config

__all__ = ["FluxTransformer2DModel"]

_TIMESTEP_FEATURES = 256

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: (L_txt + L_img, head_dim) each


class FluxPosEmbed(nn.Module):
    """Multi-axis RoPE: each id axis gets its share of the head channels, angles in float64."""

    def __init__(self, theta: float, axes_dim: tuple[int, ...]) -> None:
        super().__init__()
        self.theta = theta
        self.axes_dim = tuple(axes_dim)

    def forward(self, ids: torch.Tensor) -> Rope:
        """(L, n_axes) position ids -> cos, sin of shape (L, sum(axes_dim))."""
        positions = ids.float()
        per_axis = [rope_cos_sin(dim, positions[:, i], self.theta) for i, dim in enumerate(self.axes_dim)]
        cos = torch.cat([c for c, _ in per_axis], dim=-1)
        sin = torch.cat([s for _, s in per_axis], dim=-1)
        return cos, sin


class FluxTimeTextEmbedding(nn.Module):
    """Timestep (+ guidance) + pooled-text conditioning vector of every AdaLN."""

    def __init__(self, embedding_dim: int, pooled_projection_dim: int, guidance_embeds: bool) -> None:
        super().__init__()
        self.timestep_embedder = MLPEmbedder(_TIMESTEP_FEATURES, embedding_dim)
        self.guidance_embedder = MLPEmbedder(_TIMESTEP_FEATURES, embedding_dim) if guidance_embeds else None
        self.text_embedder = MLPEmbedder(pooled_projection_dim, embedding_dim)

    def forward(
        self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled_projections: torch.Tensor
    ) -> torch.Tensor:
        """Timestep and guidance already scaled to [0, 1000]; (B,) each, pooled (B, P) -> (B, D)."""
        dtype = pooled_projections.dtype
        conditioning = self.timestep_embedder(timestep_sinusoids(timestep, _TIMESTEP_FEATURES).to(dtype))
        if self.guidance_embedder is not None:
            conditioning = conditioning + self.guidance_embedder(
                timestep_sinusoids(guidance, _TIMESTEP_FEATURES).to(dtype)
            )
        return conditioning + self.text_embedder(pooled_projections)


class FluxAttention(MultiHeadAttentionBase):
    """QK-normalised attention; with `added_kv_proj_dim` it is the joint text+image attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        eps: float = 1e-6,
        added_kv_proj_dim: int | None = None,
        pre_only: bool = False,
        bias: bool = True,
        qk_norms_first: bool = True,
    ) -> None:
        super().__init__(num_heads, head_dim)
        inner_dim = self.inner_dim
        # Submodules are created in diffusers' order (FLUX.1 makes the QK norms before the projections, FLUX.2
        # after), so that a seeded construction draws the same weights and the state_dict lists its keys in the
        # same order.
        if qk_norms_first:
            self._make_qk_norms(head_dim, eps)
        self.to_q = nn.Linear(dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(dim, inner_dim, bias=bias)
        if not qk_norms_first:
            self._make_qk_norms(head_dim, eps)
        if not pre_only:
            # Index 1 (dropout at training time) holds no weights; it keeps the key `to_out.0`.
            self.to_out = nn.ModuleList([nn.Linear(inner_dim, dim, bias=bias), nn.Identity()])
        if added_kv_proj_dim is not None:
            self.norm_added_q = nn.RMSNorm(head_dim, eps=eps)
            self.norm_added_k = nn.RMSNorm(head_dim, eps=eps)
            self.add_q_proj = nn.Linear(added_kv_proj_dim, inner_dim, bias=bias)
            self.add_k_proj = nn.Linear(added_kv_proj_dim, inner_dim, bias=bias)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, inner_dim, bias=bias)
            self.to_add_out = nn.Linear(inner_dim, dim, bias=bias)

    def _make_qk_norms(self, head_dim: int, eps: float) -> None:
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)

    def forward(self, hidden_states: torch.Tensor, rope: Rope) -> torch.Tensor:
        """Self-attention over (B, L, D) tokens -> (B, L, H * Dh), before any output projection."""
        q = self.project_heads(self.to_q, self.norm_q, hidden_states)
        k = self.project_heads(self.to_k, self.norm_k, hidden_states)
        v = self.project_heads(self.to_v, None, hidden_states)
        return attention(apply_rotary_interleaved(q, *rope), apply_rotary_interleaved(k, *rope), v)

    def joint_qkv(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, rope: Rope
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of text (B, Lt, D) then image (B, Li, D) tokens, rotated:
        (B, Lt + Li, H, Dh) each."""
        q = torch.cat(
            [
                self.project_heads(self.add_q_proj, self.norm_added_q, encoder_hidden_states),
                self.project_heads(self.to_q, self.norm_q, hidden_states),
            ],
            dim=1,
        )  # (B, Lt + Li, H, Dh)
        k = torch.cat(
            [
                self.project_heads(self.add_k_proj, self.norm_added_k, encoder_hidden_states),
                self.project_heads(self.to_k, self.norm_k, hidden_states),
            ],
            dim=1,
        )
        v = torch.cat(
            [
                self.project_heads(self.add_v_proj, None, encoder_hidden_states),
                self.project_heads(self.to_v, None, hidden_states),
            ],
            dim=1,
        )
        return apply_rotary_interleaved(q, *rope), apply_rotary_interleaved(k, *rope), v

    def joint_out(self, out: torch.Tensor, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention output (B, Lt + Li, H * Dh) -> projected image (B, Li, D), text (B, Lt, D)."""
        return self.to_out[0](out[:, text_len:].contiguous()), self.to_add_out(out[:, :text_len].contiguous())

    def joint(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, rope: Rope
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint attention of text (B, Lt, D) and image (B, Li, D) tokens -> projected image, text outputs."""
        out = attention(*self.joint_qkv(hidden_states, encoder_hidden_states, rope))
        return self.joint_out(out, encoder_hidden_states.shape[1])


class FluxTransformerBlock(nn.Module):
    """Dual-stream block: separate AdaLN and MLP per stream, one joint attention."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormZero(dim)
        self.attn = FluxAttention(dim, num_attention_heads, attention_head_dim, eps, added_kv_proj_dim=dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, dim, activation_fn="gelu-approximate")
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff_context = FeedForward(dim, dim, activation_fn="gelu-approximate")

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor, rope: Rope
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (B, Li, D), text (B, Lt, D), conditioning (B, D) -> updated image, text."""
        norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, temb)
        norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, temb)
        attn_x, attn_c = self.attn.joint(norm_x, norm_c, rope)

        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_x
        ff_x = self.ff(modulate(self.norm2(hidden_states), shift_mlp, scale_mlp))
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * ff_x

        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * attn_c
        ff_c = self.ff_context(modulate(self.norm2_context(encoder_hidden_states), c_shift_mlp, c_scale_mlp))
        encoder_hidden_states = clip_fp16(encoder_hidden_states + c_gate_mlp.unsqueeze(1) * ff_c)
        return hidden_states, encoder_hidden_states


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block over the joined text+image tokens: attention and MLP in parallel."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        mlp_hidden_dim = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZeroSingle(dim)
        self.proj_mlp = nn.Linear(dim, mlp_hidden_dim)
        self.proj_out = nn.Linear(dim + mlp_hidden_dim, dim)
        self.attn = FluxAttention(dim, num_attention_heads, attention_head_dim, eps=1e-6, pre_only=True)

    def forward(self, tokens: torch.Tensor, temb: torch.Tensor, rope: Rope) -> torch.Tensor:
        """Joined tokens (B, Lt + Li, D), conditioning (B, D) -> updated tokens."""
        norm_x, gate = self.norm(tokens, temb)
        mlp = linear_activation(self.proj_mlp, norm_x, "gelu_tanh")
        attn = self.attn(norm_x, rope)
        update = gate.unsqueeze(1) * self.proj_out(torch.cat([attn, mlp], dim=2))
        return clip_fp16(tokens + update)


def _position_ids(name: str, ids: Any, length: int, num_axes: int) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape ({length}, {num_axes}), got {type(ids).__name__}")
    if ids.ndim == 3:
        warnings.warn(
            f"passing a 3-D {name} is deprecated: pass ({length}, {num_axes}) without the batch dimension",
            FutureWarning,
            stacklevel=3,
        )
        ids = ids[0]
    if ids.shape != (length, num_axes):
        raise ValueError(f"{name} must have shape ({length}, {num_axes}), got {tuple(ids.shape)}")
    return ids


class FluxTransformer2DModel(ConfiguredModel, TeaCacheMixin):
    """The FLUX.1 transformer (diffusers layout and keyword arguments) with TeaCache.

    Args:
        patch_size: patch size of the output projection (the pipeline packs 2x2 latents into tokens).
        in_channels: channels of an image token.
        out_channels: channels predicted per token (default `in_channels`).
        num_layers: dual-stream blocks.
        num_single_layers: single-stream blocks.
        attention_head_dim: channels per head; must equal `sum(axes_dims_rope)`.
        num_attention_heads: heads.
        joint_attention_dim: width of the text encoder states.
        pooled_projection_dim: width of the pooled text embedding.
        guidance_embeds: the model embeds a guidance scale (FLUX.1-dev) or not (schnell).
        axes_dims_rope: RoPE channels per position-id axis.
    """

    _no_split_modules: ClassVar[list[str]] = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    _skip_layerwise_casting_patterns: ClassVar[list[str]] = ["pos_embed", "norm"]
    _repeated_blocks: ClassVar[list[str]] = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]

    # Per-sample TeaCache gathers these by batch row; the rotary tables are shared.
    teacache_row_inputs = frozenset(
        {"encoder_hidden_states", "temb", "controlnet_block_samples", "controlnet_single_block_samples"}
    )

    @register_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, ...] = (16, 56, 56),
    ) -> None:
        super().__init__()
        # An axis of 0 channels is allowed, as in diffusers: its position ids then have no effect.
        check_rope_axes("axes_dims_rope", axes_dims_rope, attention_head_dim, minimum=0)
        self.out_channels = out_channels or in_channels
        self.inner_dim = num_attention_heads * attention_head_dim

        self.pos_embed = FluxPosEmbed(theta=10000, axes_dim=tuple(axes_dims_rope))
        self.time_text_embed = FluxTimeTextEmbedding(self.inner_dim, pooled_projection_dim, guidance_embeds)
        self.context_embedder = nn.Linear(joint_attention_dim, self.inner_dim)
        self.x_embedder = nn.Linear(in_channels, self.inner_dim)
        self.transformer_blocks = nn.ModuleList(
            [FluxTransformerBlock(self.inner_dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [
                FluxSingleTransformerBlock(self.inner_dim, num_attention_heads, attention_head_dim)
                for _ in range(num_single_layers)
            ]
        )
        self.norm_out = AdaLayerNormContinuous(self.inner_dim, self.inner_dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(self.inner_dim, patch_size * patch_size * self.out_channels)

    @lora_scale_from("joint_attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        img_ids: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples: list[torch.Tensor] | None = None,
        controlnet_single_block_samples: list[torch.Tensor] | None = None,
        return_dict: bool = True,
        controlnet_blocks_repeat: bool = False,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict the flow for packed image tokens.

        Args:
            hidden_states: (B, L_img, in_channels) packed latent tokens.
            encoder_hidden_states: (B, L_txt, joint_attention_dim) text encoder states, or (1, ...): one text for
                the whole batch (broadcast, as diffusers' true CFG passes its negative prompt).
            pooled_projections: (B, pooled_projection_dim) pooled text embedding.
            timestep: (B,) sigmas in [0, 1] (scaled by 1000 inside), or a scalar.
            img_ids: (L_img, n_axes) image position ids; txt_ids: (L_txt, n_axes) text position ids.
            guidance: (B,) embedded guidance scale, required exactly when `guidance_embeds`.
            joint_attention_kwargs: None, or only a LoRA `scale`, which multiplies the adapters' weights for this call.
            controlnet_block_samples, controlnet_single_block_samples: residuals added to the image
                stream after the dual- / single-stream blocks: lists (or stacked tensors) of tensors that
                broadcast to (B, L_img, D); ignored when that block stack is empty, as in diffusers.
            return_dict: return a `Transformer2DModelOutput` instead of a tuple.

        Returns:
            (B, L_img, patch_size**2 * out_channels) prediction, in a tuple or output object.
        """
        batch, text_len = self._check_inputs(
            hidden_states, encoder_hidden_states, pooled_projections, guidance, joint_attention_kwargs
        )
        num_axes = len(self.config.axes_dims_rope)
        img_ids = _position_ids("img_ids", img_ids, hidden_states.shape[1], num_axes)
        txt_ids = _position_ids("txt_ids", txt_ids, text_len, num_axes)
        device = hidden_states.device

        hidden_states = self.x_embedder(hidden_states)  # (B, Li, D)
        dtype = hidden_states.dtype
        controlnet_block_samples = controlnet_residuals(
            "controlnet_block_samples", controlnet_block_samples, self.transformer_blocks, hidden_states
        )
        controlnet_single_block_samples = controlnet_residuals(
            "controlnet_single_block_samples",
            controlnet_single_block_samples,
            self.single_transformer_blocks,
            hidden_states,
        )
        timestep = batch_vector("timestep", timestep, batch, device).expand(batch).to(dtype) * 1000
        if guidance is not None:
            guidance = batch_vector("guidance", guidance, batch, device).expand(batch).to(dtype) * 1000
        temb = self.time_text_embed(timestep, guidance, pooled_projections)  # (B, D)
        text = encoder_hidden_states
        # Only the blocks read the projected text and the rotary tables: a skipped step computes neither.
        hidden_states = self.run_blocks(
            hidden_states,
            encoder_hidden_states=Deferred(lambda: self.context_embedder(text), (text,)),  # (B, Lt, D)
            temb=temb,
            rope=Deferred(lambda: self.pos_embed(torch.cat([txt_ids, img_ids], dim=0)), (txt_ids, img_ids)),
            controlnet_block_samples=controlnet_block_samples,
            controlnet_single_block_samples=controlnet_single_block_samples,
            controlnet_blocks_repeat=controlnet_blocks_repeat,
        )  # (B, Li, D)

        output = self.proj_out(self.norm_out(hidden_states, temb))
        return (output,) if not return_dict else Transformer2DModelOutput(sample=output)

    # ---- TeaCache seam ----------------------------------------------------------------------------

    def teacache_indicator(self, hidden_states: torch.Tensor, temb: torch.Tensor, **_: Any) -> torch.Tensor:
        """Block 0's AdaLN-modulated image tokens (B, Li, D)."""
        if len(self.transformer_blocks):
            return self.transformer_blocks[0].norm1(hidden_states, temb)[0]
        if len(self.single_transformer_blocks):
            return self.single_transformer_blocks[0].norm(hidden_states, temb)[0]
        return hidden_states

    def forward_blocks(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rope: Rope,
        controlnet_block_samples: list[torch.Tensor] | None = None,
        controlnet_single_block_samples: list[torch.Tensor] | None = None,
        controlnet_blocks_repeat: bool = False,
    ) -> torch.Tensor:
        """Dual-stream then single-stream blocks: image (B, Li, D) -> image (B, Li, D)."""
        for index, block in enumerate(self.transformer_blocks):
            hidden_states, encoder_hidden_states = self.call_block(
                block, hidden_states, encoder_hidden_states, temb, rope
            )
            if controlnet_block_samples:
                if controlnet_blocks_repeat:
                    sample = controlnet_block_samples[index % len(controlnet_block_samples)]
                else:
                    interval = int(np.ceil(len(self.transformer_blocks) / len(controlnet_block_samples)))
                    sample = controlnet_block_samples[index // interval]
                hidden_states = hidden_states + sample

        text_len = encoder_hidden_states.shape[1]
        # The single-stream blocks keep text and image joined; splitting after each block would only copy.
        tokens = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # (B, Lt + Li, D)
        for index, block in enumerate(self.single_transformer_blocks):
            tokens = self.call_block(block, tokens, temb, rope)
            if controlnet_single_block_samples:
                interval = int(np.ceil(len(self.single_transformer_blocks) / len(controlnet_single_block_samples)))
                image = tokens[:, text_len:] + controlnet_single_block_samples[index // interval]
                tokens = torch.cat([tokens[:, :text_len], image], dim=1)
        return tokens[:, text_len:]

    # ---- input validation -------------------------------------------------------------------------

    def _check_inputs(
        self,
        hidden_states: Any,
        encoder_hidden_states: Any,
        pooled_projections: Any,
        guidance: Any,
        joint_attention_kwargs: dict[str, Any] | None,
    ) -> tuple[int, int]:
        config = self.config
        check_tokens("hidden_states", hidden_states, None, config.in_channels)
        batch = hidden_states.shape[0]
        # One sample's text may stand for the whole batch, as in diffusers (its true CFG's negative prompt).
        check_tokens("encoder_hidden_states", encoder_hidden_states, batch, config.joint_attention_dim, broadcast=True)
        check_tensor("pooled_projections", pooled_projections, ((1, batch), config.pooled_projection_dim))
        check_dtype("hidden_states", hidden_states, self.x_embedder.weight.dtype)
        check_dtype("encoder_hidden_states", encoder_hidden_states, self.context_embedder.weight.dtype)
        check_dtype("pooled_projections", pooled_projections, self.time_text_embed.text_embedder.linear_1.weight.dtype)
        check_guidance(guidance, config.guidance_embeds, "FLUX.1-dev", "FLUX.1-schnell")
        check_attention_kwargs("joint_attention_kwargs", joint_attention_kwargs)
        return batch, encoder_hidden_states.shape[1]
