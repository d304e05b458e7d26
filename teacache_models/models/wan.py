"""Wan 2.1 / 2.2: the native video transformer, with TeaCache on its block stack.

Architecture, parameter names and numerics follow diffusers' `WanTransformer3DModel`: latents are cut
into 3-D patches, every block runs self-attention (3-axis RoPE), cross-attention to the UMT5 text
tokens (plus, for Wan2.1 I2V, CLIP image tokens through separate K/V projections) and an MLP, each
modulated by the timestep projection; an AdaLN head unpatchifies the result. The timestep is one value
per sample, or one per token (Wan2.2 TI2V: the conditioning frame's tokens carry timestep 0).

Precision follows the released checkpoints: the time embedder, the scale-shift tables and the norms
are kept in float32 by a loader honouring `_keep_in_fp32_modules`, and every residual update and
modulation is computed in float32 before returning to the model's dtype.

TeaCache indicators: the timestep embedding `temb` (the published Wan choice; its schedule is the same
for every prompt and both CFG branches), the timestep projection `timestep_proj` (what
`use_ret_steps=True` uses) and block 0's modulated input (adapts per prompt; for calibration). The
published fits per checkpoint are in the model zoo (`configs/wan*.yaml`). Wan2.2 A14B's two experts are
routed by `WanExpertPair` (`wan_experts`), which keeps the cache state of each expert apart.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, ClassVar

import torch
from torch import nn

from ..cache.mixin import Deferred, TeaCacheIndicator, TeaCacheMixin
from ..checks import (
    check_attention_kwargs,
    check_dtype,
    check_tokens,
    check_video_latents,
    is_int,
    require_real_tensor,
)
from ..distributed.sequence import SequenceParallel, SequenceParallelMixin
from ..layers.attention import attention
from ..layers.embeddings import MLPEmbedder, timestep_sinusoids
from ..layers.feedforward import FeedForward
from ..layers.normalization import FP32LayerNorm
from ..layers.rope import rope_cos_sin
from ..lora import lora_scale_from
from .base import ConfiguredModel, Transformer2DModelOutput, register_config

__all__ = ["WanTransformer3DModel"]

# The UMT5 context length: diffusers' I2V attention takes the last 512 context tokens as text.
TEXT_CONTEXT_LEN = 512

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: (1, L, 1, head_dim) each


# ---- embeddings ------------------------------------------------------------------------------------


class WanRotaryPosEmbed(nn.Module):
    """3-axis RoPE tables (frames, height, width), one row per position up to `max_seq_len`.

    The tables are non-persistent buffers, as in diffusers, so they follow `module.to(dtype)` the same way.
    """

    def __init__(self, attention_head_dim: int, max_seq_len: int) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.h_dim = self.w_dim = 2 * (attention_head_dim // 6)
        self.t_dim = attention_head_dim - self.h_dim - self.w_dim
        cos, sin = self._tables(None)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)

    def _tables(self, device: torch.device | None) -> Rope:
        # diffusers picks float32 whenever MPS exists on the machine, whatever the device in use.
        freqs_dtype = torch.float32 if torch.backends.mps.is_available() else torch.float64
        positions = torch.arange(self.max_seq_len, device=device)
        axes = [rope_cos_sin(dim, positions, 10000.0, freqs_dtype) for dim in (self.t_dim, self.h_dim, self.w_dim)]
        return torch.cat([c for c, _ in axes], dim=1), torch.cat([s for _, s in axes], dim=1)  # (S, head_dim)

    def forward(self, frames: int, height: int, width: int, device: torch.device) -> Rope:
        """Post-patch grid sizes -> cos, sin of shape (1, frames * height * width, 1, head_dim)."""
        cos_table, sin_table = self.freqs_cos, self.freqs_sin
        if cos_table.is_meta:
            # Built on the meta device, then loaded with assign=True: the state dict has no tables to fill in.
            cos_table, sin_table = self._tables(device)
            self.freqs_cos, self.freqs_sin = cos_table, sin_table
        split = [self.t_dim, self.h_dim, self.w_dim]
        return self._grid(cos_table.split(split, dim=1), frames, height, width), self._grid(
            sin_table.split(split, dim=1), frames, height, width
        )

    @staticmethod
    def _grid(tables: tuple[torch.Tensor, ...], frames: int, height: int, width: int) -> torch.Tensor:
        t, h, w = tables
        grid = torch.cat(
            [
                t[:frames].view(frames, 1, 1, -1).expand(frames, height, width, -1),
                h[:height].view(1, height, 1, -1).expand(frames, height, width, -1),
                w[:width].view(1, 1, width, -1).expand(frames, height, width, -1),
            ],
            dim=-1,
        )  # (F, H, W, head_dim)
        return grid.reshape(1, frames * height * width, 1, -1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i + 1) of (B, L, H, D) tokens.

    The arithmetic runs in the promoted dtype of `x` and the tables (float32 tables stay float32 even for
    bfloat16 tokens), with one rounding back to the dtype of `x`, as diffusers does.
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, H, D / 2) each
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    # Written into the strided halves of one output (the rounding to x's dtype happens on assignment):
    # cheaper than stacking the two halves and flattening them.
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out


class WanImageEmbedding(nn.Module):
    """CLIP image tokens -> model width: norm, GELU MLP, norm (plus a learned position table for FLF2V)."""

    def __init__(self, in_features: int, out_features: int, pos_embed_seq_len: int | None = None) -> None:
        super().__init__()
        self.norm1 = FP32LayerNorm(in_features)
        self.ff = FeedForward(in_features, out_features, mult=1, activation_fn="gelu")
        self.norm2 = FP32LayerNorm(out_features)
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, pos_embed_seq_len, in_features)) if pos_embed_seq_len is not None else None
        )

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """(B, Li, image_dim) -> (B, Li, D); with a position table (2B, Li, image_dim) -> (B, 2 Li, D)."""
        if self.pos_embed is not None:
            # First-last-frame checkpoints pair the two images of each sample into one token sequence.
            _, length, width = image_tokens.shape
            image_tokens = image_tokens.reshape(-1, 2 * length, width) + self.pos_embed
        return self.norm2(self.ff(self.norm1(image_tokens)))


class WanTimeTextImageEmbedding(nn.Module):
    """Timestep embedding and its 6-way block modulation, text projection, image projection."""

    def __init__(
        self,
        dim: int,
        time_freq_dim: int,
        time_proj_dim: int,
        text_embed_dim: int,
        image_embed_dim: int | None = None,
        pos_embed_seq_len: int | None = None,
    ) -> None:
        super().__init__()
        self.time_freq_dim = time_freq_dim
        self.time_embedder = MLPEmbedder(time_freq_dim, dim)
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(dim, time_proj_dim)
        self.text_embedder = MLPEmbedder(text_embed_dim, dim, act="gelu_tanh")
        self.image_embedder = (
            WanImageEmbedding(image_embed_dim, dim, pos_embed_seq_len) if image_embed_dim is not None else None
        )

    def forward(
        self,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Timestep (B,) or per-token (B, L) -> temb (B, D) or (B, L, D), timestep_proj (B[, L], 6 D),
        text (B, Lt, D), image (B, Li, D) or None."""
        temb, timestep_proj = self.embed_timestep(timestep, encoder_hidden_states.dtype)
        return (temb, timestep_proj, *self.embed_context(encoder_hidden_states, encoder_hidden_states_image))

    def embed_timestep(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """temb and timestep_proj, in `dtype` (the model's: that of the text states, as in the reference)."""
        features = timestep_sinusoids(timestep.flatten(), self.time_freq_dim)  # float32
        if timestep.ndim == 2:
            features = features.unflatten(0, timestep.shape)
        embedder_dtype = self.time_embedder.linear_1.weight.dtype
        if embedder_dtype != torch.int8:  # quantised embedders take the float32 features as they are
            features = features.to(embedder_dtype)
        temb = self.time_embedder(features).to(dtype)
        return temb, self.time_proj(self.act_fn(temb))

    def embed_context(
        self, encoder_hidden_states: torch.Tensor, encoder_hidden_states_image: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The projected text (B, Lt, D) and image tokens (B, Li, D) or None."""
        image = None
        if encoder_hidden_states_image is not None:
            image = self.image_embedder(encoder_hidden_states_image)
        return self.text_embedder(encoder_hidden_states), image


# ---- attention and blocks --------------------------------------------------------------------------


class WanAttention(nn.Module):
    """Attention with RMS-normalised queries and keys (across all heads).

    With `added_kv_proj_dim` the cross-attention also attends to the image tokens through its own K/V
    projections; the two attention outputs are summed before the output projection.

    `sequence_parallel` (set by `WanTransformer3DModel.enable_sequence_parallel`) makes the
    self-attention attend over every rank's token shard; cross-attention reads the full context anyway.
    """

    sequence_parallel: SequenceParallel | None = None

    def __init__(self, dim: int, heads: int, eps: float, added_kv_proj_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        # Index 1 (dropout at training time) holds no weights; it keeps the key `to_out.0`.
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        if added_kv_proj_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, dim)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(2, (self.heads, -1))  # (B, L, D) -> (B, L, H, Dh)

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor | None = None,
        rope: Rope | None = None,
        image_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens (B, L, D) attend to themselves (context None) or to context (B, Lc, D) -> (B, L, D)."""
        source = hidden_states if context is None else context
        query = self._heads(self.norm_q(self.to_q(hidden_states)))
        key = self._heads(self.norm_k(self.to_k(source)))
        value = self._heads(self.to_v(source))
        if rope is not None:
            query, key = _apply_rope(query, *rope), _apply_rope(key, *rope)
        if context is None and self.sequence_parallel is not None:
            out = self.sequence_parallel.attention(query, key, value)  # (B, L, D), L: this rank's shard
        else:
            out = attention(query, key, value)  # (B, L, D)
        if image_context is not None:
            image_key = self._heads(self.norm_added_k(self.add_k_proj(image_context)))
            image_value = self._heads(self.add_v_proj(image_context))
            out = out + attention(query, image_key, image_value)
        return self.to_out[0](out)


class WanTransformerBlock(nn.Module):
    """Self-attention, cross-attention, MLP; the modulations and residual updates are in float32."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        cross_attn_norm: bool,
        eps: float,
        added_kv_proj_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, num_heads, eps)
        self.attn2 = WanAttention(dim, num_heads, eps, added_kv_proj_dim)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate")
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def modulation(self, timestep_proj: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, L or 1, 6, D) -> shift, scale, gate (attention), shift, scale, gate (MLP): (B, L or 1, D) float32."""
        return tuple(part.squeeze(2) for part in (self.scale_shift_table + timestep_proj.float()).chunk(6, dim=2))

    def modulated_input(self, hidden_states: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (self.norm1(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor,
        timestep_proj: torch.Tensor,
        rope: Rope,
        image_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens (B, L, D), context (B, Lc, D), modulation (B, L or 1, 6, D) -> tokens (B, L, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(timestep_proj)
        x = hidden_states

        attn = self.attn1(self.modulated_input(x, shift_msa, scale_msa), rope=rope)
        x = (x.float() + attn * gate_msa).type_as(x)

        attn = self.attn2(self.norm2(x.float()).type_as(x), context, image_context=image_context)
        x = x + attn

        ff = self.ffn((self.norm3(x.float()) * (1 + scale_mlp) + shift_mlp).type_as(x))
        return (x.float() + ff.float() * gate_mlp).type_as(x)


# ---- the model -------------------------------------------------------------------------------------


class WanTransformer3DModel(ConfiguredModel, TeaCacheMixin, SequenceParallelMixin):
    """The Wan 2.1 / 2.2 transformer (diffusers layout and keyword arguments) with TeaCache.

    Args:
        patch_size: (t, h, w) patch of the latent video.
        num_attention_heads: heads.
        attention_head_dim: channels per head (even: the RoPE splits it into three even axes).
        in_channels: latent channels (16 T2V; 36 I2V: noise, mask and condition latents; 48 TI2V-5B).
        out_channels: predicted channels (None: `in_channels`).
        text_dim: width of the UMT5 text states.
        freq_dim: sinusoidal features of the timestep.
        ffn_dim: hidden width of the block MLP.
        num_layers: blocks.
        cross_attn_norm: LayerNorm (with weights) before the cross-attention.
        qk_norm: "rms_norm_across_heads" or None; as in diffusers, queries and keys are RMS-normalised
            across heads either way.
        eps: epsilon of the norms.
        image_dim: width of the CLIP image tokens (Wan2.1 I2V), None for none.
        added_kv_proj_dim: width of the image K/V projections' input (the model width); with it, the
            text context is exactly 512 tokens.
        rope_max_seq_len: RoPE positions per axis.
        pos_embed_seq_len: length of the image-token position table (first-last-frame checkpoints).
    """

    _skip_layerwise_casting_patterns: ClassVar[list[str]] = ["patch_embedding", "condition_embedder", "norm"]
    _no_split_modules: ClassVar[list[str]] = ["WanTransformerBlock"]
    _repeated_blocks: ClassVar[list[str]] = ["WanTransformerBlock"]
    _keep_in_fp32_modules: ClassVar[list[str]] = [
        "rope",
        "time_embedder",
        "scale_shift_table",
        "norm1",
        "norm2",
        "norm3",
    ]
    # Some original checkpoints carry a query norm for the image branch that no computation uses.
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = ["norm_added_q"]
    # eps must also be below 1 (see `_check_architecture`).
    _arguments_checked_by_model: ClassVar[tuple[str, ...]] = ("eps",)

    teacache_indicators = (
        TeaCacheIndicator("temb"),
        # The published ret-steps mode always computes the first 5 steps and leaves the last one free.
        TeaCacheIndicator("timestep_proj", ret_steps=True, first_forced_steps=5, free_last_steps=1),
        TeaCacheIndicator("modulated_input"),
    )
    # Per-sample TeaCache gathers these by batch row; the rotary factors are shared.
    teacache_row_inputs = frozenset({"context", "image_context", "temb", "timestep_proj"})
    # Sequence parallelism shards the self-attention of every block.
    sequence_parallel_attention = ("blocks.*.attn1",)

    @register_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
    ) -> None:
        super().__init__()
        _check_architecture(locals())
        patch_size = tuple(patch_size)
        inner_dim = num_attention_heads * attention_head_dim
        self.patch_size = patch_size
        self.out_channels = out_channels or in_channels

        self.rope = WanRotaryPosEmbed(attention_head_dim, rope_max_seq_len)
        self.patch_embedding = nn.Conv3d(in_channels, inner_dim, kernel_size=patch_size, stride=patch_size)
        self.condition_embedder = WanTimeTextImageEmbedding(
            dim=inner_dim,
            time_freq_dim=freq_dim,
            time_proj_dim=inner_dim * 6,
            text_embed_dim=text_dim,
            image_embed_dim=image_dim,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        self.blocks = nn.ModuleList(
            [
                WanTransformerBlock(inner_dim, ffn_dim, num_attention_heads, cross_attn_norm, eps, added_kv_proj_dim)
                for _ in range(num_layers)
            ]
        )
        self.norm_out = FP32LayerNorm(inner_dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(inner_dim, self.out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, inner_dim) / inner_dim**0.5)

    @lora_scale_from("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict the flow of a latent video.

        Args:
            hidden_states: (B, in_channels, F, H, W) latents; F, H, W divisible by `patch_size`.
            timestep: timesteps in [0, 1000]: a scalar, (1,) or (B,), or per token (B, L) or (1, L) with
                L = the number of patches (Wan2.2 TI2V), or (B, 1).
            encoder_hidden_states: (B, Lt, text_dim) text states (Lt = 512 when `added_kv_proj_dim` is set).
            encoder_hidden_states_image: (B, Li, image_dim) CLIP image tokens, for `image_dim` models
                only ((2B, Li, image_dim) with `pos_embed_seq_len`: first and last frame per sample).
            return_dict: return a `Transformer2DModelOutput` instead of a tuple.
            attention_kwargs: None, or only a LoRA `scale`, which multiplies the adapters' weights for this call.

        Returns:
            (B, out_channels, F, H, W) prediction, in a tuple or output object.
        """
        timestep = self._check_inputs(
            hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image, attention_kwargs
        )
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        grid = (frames // p_t, height // p_h, width // p_w)
        latents = hidden_states
        hidden_states = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()  # (B, L, D)
        temb, timestep_proj = self.condition_embedder.embed_timestep(timestep, encoder_hidden_states.dtype)
        # One modulation per sample becomes a length-1 token axis, so both timestep forms share one path.
        timestep_proj = timestep_proj.unflatten(-1, (6, -1))  # (B, 6, D) or (B, L, 6, D)
        if timestep_proj.ndim == 3:
            temb, timestep_proj = temb.unsqueeze(1), timestep_proj.unsqueeze(1)  # (B, 1, D), (B, 1, 6, D)
        sp = self.sequence_parallel
        if sp is not None:
            # This rank keeps its shard of the tokens and of everything given per token.
            sp.begin(hidden_states.shape[1])
            hidden_states = sp.shard(hidden_states)  # (B, L / N, D)
            if temb.shape[1] != 1:
                temb, timestep_proj = sp.shard(temb), sp.shard(timestep_proj)

        def rope() -> tuple[torch.Tensor, torch.Tensor]:
            cos, sin = self.rope(*grid, device=latents.device)
            return (cos, sin) if sp is None else (sp.shard(cos), sp.shard(sin))

        # Only the blocks read the projected text and image tokens and the rotary tables: a skipped step
        # computes none of them. Both context inputs come from one computation, made once.
        contexts: list[tuple[torch.Tensor, torch.Tensor | None]] = []

        def context(part: int) -> torch.Tensor | None:
            if not contexts:
                contexts.append(self._joint_context(encoder_hidden_states, encoder_hidden_states_image))
            return contexts[0][part]

        sources = (encoder_hidden_states, encoder_hidden_states_image)
        hidden_states = self.run_blocks(
            hidden_states,
            context=Deferred(lambda: context(0), sources),
            image_context=Deferred(lambda: context(1), sources),
            temb=temb,
            timestep_proj=timestep_proj,
            rope=Deferred(rope, (tuple(latents.shape[1:]),)),  # per sample: a batch of any size shares it
        )  # (B, L, D)

        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
        shift, scale = shift.squeeze(2), scale.squeeze(2)  # (B, L or 1, D)
        hidden_states = (self.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        hidden_states = self.proj_out(hidden_states)  # (B, L, p_t * p_h * p_w * C)
        if sp is not None:
            hidden_states = sp.gather(hidden_states)  # every rank's shard: (B, L, p_t * p_h * p_w * C)

        output = hidden_states.reshape(batch, *grid, p_t, p_h, p_w, -1)
        output = output.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(batch, -1, frames, height, width)
        return (output,) if not return_dict else Transformer2DModelOutput(sample=output)

    def _joint_context(
        self, encoder_hidden_states: torch.Tensor, encoder_hidden_states_image: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cross-attention context (B, [Li +] Lt, D) and, with image K/V projections, the image part."""
        context, image_context = self.condition_embedder.embed_context(
            encoder_hidden_states, encoder_hidden_states_image
        )
        if image_context is None:
            return context, None
        # Image tokens go ahead of the text. With image K/V projections the two parts are then taken back
        # as views of the joined tensor: half-precision matmuls round differently on such strided views
        # than on separate tensors, and the reference reads these views.
        image_len = image_context.shape[1]
        context = torch.cat([image_context, context], dim=1)  # (B, Li + Lt, D)
        if self.config.added_kv_proj_dim is None:
            return context, None
        return context[:, image_len:], context[:, :image_len]

    # ---- TeaCache seam ----------------------------------------------------------------------------

    def teacache_indicator(
        self, hidden_states: torch.Tensor, temb: torch.Tensor, timestep_proj: torch.Tensor, **_: Any
    ) -> torch.Tensor:
        """`temb` (B, L or 1, D), `timestep_proj` (B, L or 1, 6, D) or block 0's modulated input (B, L, D)
        (under sequence parallelism the mixin keeps this rank's real tokens)."""
        name = self.teacache_indicator_name
        if name == "temb":
            return temb
        if name == "timestep_proj":
            return timestep_proj
        if not len(self.blocks):
            return hidden_states
        block = self.blocks[0]
        shift, scale = block.modulation(timestep_proj)[:2]
        return block.modulated_input(hidden_states, shift, scale)

    def forward_blocks(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor,
        image_context: torch.Tensor | None,
        temb: torch.Tensor,
        timestep_proj: torch.Tensor,
        rope: Rope,
    ) -> torch.Tensor:
        """The blocks: tokens (B, L, D) -> tokens (B, L, D)."""
        for block in self.blocks:
            hidden_states = self.call_block(block, hidden_states, context, timestep_proj, rope, image_context)
        return hidden_states

    # ---- input validation -------------------------------------------------------------------------

    def _check_inputs(
        self,
        hidden_states: Any,
        timestep: Any,
        encoder_hidden_states: Any,
        encoder_hidden_states_image: Any,
        attention_kwargs: dict[str, Any] | None,
    ) -> torch.Tensor:
        """Validate the forward inputs; returns the timestep as a (1,), (B,) or (B, L) tensor."""
        config = self.config
        dtype = self.patch_embedding.weight.dtype
        batch, grid = check_video_latents("hidden_states", hidden_states, config.in_channels, dtype, self.patch_size)
        # An axis whose RoPE has no channels (heads narrower than 6) reads no table row, so any size passes there.
        rope = self.rope
        if (
            max(n for n, dim in zip(grid, (rope.t_dim, rope.h_dim, rope.w_dim), strict=True) if dim)
            > config.rope_max_seq_len
        ):
            raise ValueError(
                f"hidden_states has {tuple(grid)} patches along (frames, height, width); at most "
                f"rope_max_seq_len={config.rope_max_seq_len} per axis are supported"
            )
        num_tokens = math.prod(grid)

        check_tokens("encoder_hidden_states", encoder_hidden_states, batch, config.text_dim, min_length=1)
        check_dtype(
            "encoder_hidden_states", encoder_hidden_states, self.condition_embedder.text_embedder.linear_1.weight.dtype
        )
        if config.added_kv_proj_dim is not None and encoder_hidden_states.shape[1] != TEXT_CONTEXT_LEN:
            raise ValueError(
                f"encoder_hidden_states must have {TEXT_CONTEXT_LEN} tokens for a model with image K/V projections "
                f"(added_kv_proj_dim={config.added_kv_proj_dim}), got {encoder_hidden_states.shape[1]}: pad the "
                "text states to the UMT5 context length"
            )
        self._check_image_tokens(encoder_hidden_states_image, batch)
        check_attention_kwargs("attention_kwargs", attention_kwargs)
        return _check_timestep(timestep, batch, num_tokens, hidden_states.device)

    def _check_image_tokens(self, image: Any, batch: int) -> None:
        config = self.config
        if image is None:
            if config.added_kv_proj_dim is not None:
                raise ValueError(
                    "encoder_hidden_states_image is required: this model attends to CLIP image tokens "
                    f"(added_kv_proj_dim={config.added_kv_proj_dim}, e.g. Wan2.1 I2V)"
                )
            return
        if config.image_dim is None:
            raise ValueError(
                "encoder_hidden_states_image must be None: this model has no image embedder (image_dim=None, "
                "a text-to-video or Wan2.2 checkpoint)"
            )
        pairs = config.pos_embed_seq_len is not None
        image_batch = 2 * batch if pairs else batch
        check_tokens("encoder_hidden_states_image", image, image_batch, config.image_dim, min_length=1)
        embedder = self.condition_embedder.image_embedder
        check_dtype("encoder_hidden_states_image", image, embedder.ff.net[0].proj.weight.dtype)
        if pairs and config.pos_embed_seq_len not in (1, 2 * image.shape[1]):
            raise ValueError(
                f"encoder_hidden_states_image must have pos_embed_seq_len / 2 = {config.pos_embed_seq_len / 2:g} "
                f"tokens per image (two images per sample), got {image.shape[1]}"
            )


def _check_timestep(timestep: Any, batch: int, num_tokens: int, device: torch.device) -> torch.Tensor:
    allowed = f"(), (1,), ({batch},), ({batch}, {num_tokens}), (1, {num_tokens}) or ({batch}, 1)"
    timestep = require_real_tensor("timestep", timestep, device)
    if timestep.ndim == 0:
        return timestep.reshape(1)
    if timestep.ndim == 1 and timestep.shape[0] in (1, batch):
        return timestep
    if timestep.ndim == 2 and timestep.shape[0] in (1, batch) and timestep.shape[1] in (1, num_tokens):
        return timestep
    raise ValueError(f"timestep must have shape {allowed}, got {tuple(timestep.shape)}")


def _check_architecture(args: dict[str, Any]) -> None:
    patch = args["patch_size"]
    if not isinstance(patch, list | tuple) or len(patch) != 3 or not all(is_int(p, 1) for p in patch):
        raise ValueError(f"patch_size must be three positive integers (t, h, w), got {patch!r}")
    if args["attention_head_dim"] % 2:
        raise ValueError(
            f"attention_head_dim must be even (RoPE rotates channel pairs), got {args['attention_head_dim']}"
        )
    if args["qk_norm"] not in (None, "rms_norm_across_heads"):
        raise ValueError(f"qk_norm must be 'rms_norm_across_heads' or None, got {args['qk_norm']!r}")
    eps = args["eps"]
    if isinstance(eps, bool) or not isinstance(eps, Real) or not 0 < eps < 1:
        raise ValueError(f"eps must be a number in (0, 1), got {eps!r}")
    inner_dim = args["num_attention_heads"] * args["attention_head_dim"]
    added = args["added_kv_proj_dim"]
    if added is not None:
        if args["image_dim"] is None:
            raise ValueError(f"added_kv_proj_dim={added} needs image_dim: the image K/V projections read image tokens")
        if added != inner_dim:
            raise ValueError(
                f"added_kv_proj_dim must equal num_attention_heads * attention_head_dim = {inner_dim} (the image "
                f"tokens are projected to the model width before it), got {added}"
            )
    if args["pos_embed_seq_len"] is not None and args["image_dim"] is None:
        raise ValueError("pos_embed_seq_len is a position table for image tokens: it needs image_dim")
