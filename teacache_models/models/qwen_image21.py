"""Qwen-Image-2.1: the native single-stream transformer, with TeaCache on its block stack.

Architecture, parameter names and numerics follow diffusers' `QwenImage21Transformer2DModel`. Text and image
share one sequence: the vision-language encoder's states come with image slots (`img_mask`), each slot stands for
a 2x2 group of latent tokens, so the slots are widened four-fold and the packed latents (condition images first,
the generated image last) fill them; the generated image's slots follow the text. One modulation projection,
shared by every block, gives each token a scale and a tanh-gated residual; with `causal_condition` the text and
condition-image tokens are modulated at t = 0, which makes their keys and values the same at every step (the
`kv_cache` of diffusers' pipeline). Attention is block-causal: causal over the sequence, bidirectional inside each
image; it runs as diffusers' default processor does, one exact attention call per prefix segment and one for the
generated image. Positions are complex RoPE factors: text advances one position on all three axes, an image
freezes the frame axis and lays its tokens on a centred grid.

TeaCache skips the whole block stack; its indicator is block 0's `img_norm1` output scaled by the shared
modulation, over the generated image's tokens (the prefix's is the same at every step under `causal_condition`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import torch
from torch import nn

from ..cache.mixin import TeaCacheMixin
from ..checks import (
    batch_vector,
    check_attention_kwargs,
    check_dtype,
    check_rope_axes,
    check_tokens,
)
from ..layers.attention import MultiHeadAttentionBase, attention
from ..layers.embeddings import MLPEmbedder
from ..layers.kv_cache import KVLayerCache
from ..layers.normalization import RMSNorm
from ..layers.precision import clip_fp16
from ..layers.rope import apply_rotary_complex
from ..lora import lora_scale_from
from .base import ConfiguredModel, Transformer2DModelOutput, register_config

__all__ = ["QwenImage21KVCache", "QwenImage21Transformer2DModel"]

_TIMESTEP_FEATURES = 256
_ROPE_THETA = 10000
# The rotary tables cover positions 0..8191 and -1024..-1 (the reference's).
_ROPE_POSITIVE, _ROPE_NEGATIVE = 8192, 1024
# A vision-language image slot stands for a 2 x 2 group of latent tokens.
_TOKENS_PER_SLOT = 4

Segments = list[tuple[int, int, bool]]  # (start, end, is_text) runs of the prefix


# ---- the key/value cache of the prefix -------------------------------------------------------------------


class QwenImage21KVLayerCache(KVLayerCache):
    """One block's keys and values (after RoPE) of the prefix tokens, (B, L_prefix, H, Dh) each, as `k` and `v`."""


class QwenImage21KVCache:
    """Every block's prefix cache (the interface of diffusers' class of the same name, which works here too)."""

    def __init__(self, num_layers: int) -> None:
        self.layer_caches = [QwenImage21KVLayerCache() for _ in range(num_layers)]

    def get_layer(self, layer_idx: int) -> QwenImage21KVLayerCache:
        return self.layer_caches[layer_idx]


# ---- embeddings and positions ----------------------------------------------------------------------------


class QwenImage21TemporalTimesteps(nn.Module):
    """Sigmas (N,) -> (N, 256) float32 features: cosines first, of 1000 * sigma.

    The frequencies are a non-persistent buffer, as in diffusers: built in float32 (and kept so by loading with a
    dtype), but rounded with the model by `model.to(dtype)`, which changes the features of a half-precision model.
    """

    def __init__(self, dim: int = _TIMESTEP_FEATURES, max_period: int = 10000) -> None:
        super().__init__()
        half = dim // 2
        frequencies = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
        self.register_buffer("freqs", frequencies, persistent=False)

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        timestep = 1000.0 * timestep.float()
        angles = timestep[:, None] * self.freqs[None].to(timestep.device)  # float32 whatever the buffer's dtype
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class QwenImage21TimestepProjEmbeddings(nn.Module):
    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        self.time_proj = QwenImage21TemporalTimesteps()
        self.timestep_embedder = MLPEmbedder(_TIMESTEP_FEATURES, embedding_dim, bias=False)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(self.time_proj(timestep).to(dtype))  # (N, D)


class ZeroCenteredRMSNorm(nn.Module):
    """RMSNorm in float32 whose stored weight is the scale minus one (the checkpoint's convention)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.float()
        inverse_rms = torch.rsqrt(torch.mean(wide**2, dim=-1, keepdim=True) + self.eps)
        return (wide * inverse_rms * (self.weight.float() + 1)).to(x.dtype)


class QwenImage21TextProjection(nn.Module):
    def __init__(self, context_in_dim: int, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.text_norm = ZeroCenteredRMSNorm(context_in_dim, eps=eps)
        self.in_layer = nn.Linear(context_in_dim, hidden_size, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.out_layer = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.act(self.in_layer(self.text_norm(x))))


@functools.cache
def _axis_table(dim: int) -> torch.Tensor:
    """Complex64 factors of one axis on the CPU: rows 0..8191 hold positions 0..8191, the last 1024 rows positions
    -1024..-1, so that indexing with a negative position reaches its row."""
    inverse = 1.0 / torch.pow(_ROPE_THETA, torch.arange(0, dim, 2).to(torch.float32).div(dim))
    rows = [torch.arange(_ROPE_POSITIVE), torch.arange(_ROPE_NEGATIVE).flip(0) * -1 - 1]
    angles = [torch.outer(index, inverse) for index in rows]
    return torch.cat([torch.polar(torch.ones_like(a), a) for a in angles])


def _joint_positions(image_shapes: list[tuple[int, int, int]], is_image: torch.Tensor) -> torch.Tensor:
    """(L, 3) integer (frame, row, column) positions of the joint sequence: text advances all three together;
    an image takes the frame position the text reached and a centred grid, then the position moves on by its
    larger side."""
    flags = is_image.tolist()
    frames: list[int] = []
    rows: list[int] = []
    columns: list[int] = []
    cursor = position = 0
    for _, height, width in image_shapes:
        start = flags.index(True, cursor)
        frames.extend(range(position, position + start - cursor))
        position += start - cursor
        cursor = start + height * width
        frames.extend([position] * (height * width))
        position += max(height, width)
        rows.extend(r for r in range(-(height - height // 2), height // 2) for _ in range(width))
        columns.extend(c for _ in range(height) for c in range(-(width - width // 2), width // 2))
    frames.extend(range(position, position + len(flags) - cursor))
    frame = torch.tensor(frames, dtype=torch.long)
    row, column = frame.clone(), frame.clone()
    row[is_image.cpu()] = torch.tensor(rows, dtype=torch.long)
    column[is_image.cpu()] = torch.tensor(columns, dtype=torch.long)
    return torch.stack([frame, row, column], dim=-1)


def _rope_factors(
    axes_dims: tuple[int, int, int], image_shapes: list[tuple[int, int, int]], is_image: torch.Tensor
) -> torch.Tensor:
    """(L, Dh / 2) complex factors of the joint sequence."""
    positions = _joint_positions(image_shapes, is_image)
    lowest, highest = int(positions.min()), int(positions.max())
    if lowest < -_ROPE_NEGATIVE or highest >= _ROPE_POSITIVE:
        raise ValueError(
            f"the joint sequence needs RoPE positions {lowest}..{highest}; Qwen-Image-2.1's rotary tables cover "
            f"{-_ROPE_NEGATIVE}..{_ROPE_POSITIVE - 1}"
        )
    device = is_image.device
    return torch.cat(
        [_axis_table(dim).to(device)[positions[:, axis].to(device)] for axis, dim in enumerate(axes_dims)], dim=-1
    )


def _token_blocks(
    is_image: torch.Tensor, image_shapes: list[tuple[int, int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image id per token, -1 for text; True at the generated image's tokens), both (L,). Blocks come from the
    token counts of `image_shapes`, so two adjacent condition images stay two blocks."""
    positions = is_image.nonzero(as_tuple=True)[0]
    lengths = [math.prod(shape) for shape in image_shapes]
    ids = torch.full_like(is_image, -1, dtype=torch.long)
    ids[positions] = torch.tensor([b for b, n in enumerate(lengths) for _ in range(n)], device=is_image.device)
    target = torch.zeros_like(is_image)
    target[positions[-lengths[-1] :]] = True
    return ids, target


def _prefix_segments(ids: torch.Tensor, prefix_len: int) -> Segments:
    """Runs of equal image id in the prefix, as (start, end, is_text)."""
    values = ids[:prefix_len].tolist()
    segments, start = [], 0
    for index in range(1, prefix_len + 1):
        if index == prefix_len or values[index] != values[start]:
            segments.append((start, index, values[start] < 0))
            start = index
    return segments


def _rows_for_tokens(params: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Per-sample rows (B, D) -> (B, 1, D); with `target` ((L,) bool, causal_condition) the params hold B rows of
    the real timestep and one of t = 0, which the tokens outside the generated image take: (B, L, D)."""
    if target is None:
        return params.unsqueeze(1)
    return torch.where(target.view(1, -1, 1), params[:-1].unsqueeze(1), params[-1:].unsqueeze(0))


@dataclasses.dataclass(frozen=True)
class _BlockPlan:
    """How every block runs in one call.

    `target`: (L,) True at the generated image's tokens, which take the real timestep's modulation rows (the others
    take those of t = 0); None without `causal_condition`. `rope`: (L, Dh / 2) complex factors of the tokens that
    run. With `segments`, the block-causal prefill over the whole sequence (`key_valid` (B, L) masks padded text
    keys); without, full attention of the generated image over the cached prefix and itself (`attention_mask` on
    the keys). `kv_cache_mode` "extract" stores each layer's keys and values of the first `prefix_len` tokens,
    "cached" reads them.
    """

    target: torch.Tensor | None
    rope: torch.Tensor
    attention_mask: torch.Tensor | None
    segments: Segments | None
    key_valid: torch.Tensor | None
    kv_cache_mode: str | None
    prefix_len: int


# ---- layers ------------------------------------------------------------------------------------------


class QwenImage21Attention(MultiHeadAttentionBase):
    """Single-stream attention with RMS-normalised queries and keys and complex RoPE; no biases."""

    def __init__(self, dim: int, heads: int, dim_head: int, eps: float = 1e-6) -> None:
        super().__init__(heads, dim_head)
        self.heads = heads
        self.to_q = nn.Linear(dim, self.inner_dim, bias=False)
        self.to_k = nn.Linear(dim, self.inner_dim, bias=False)
        self.to_v = nn.Linear(dim, self.inner_dim, bias=False)
        # Index 1 (dropout at training time) holds no weights; it keeps the key `to_out.0`.
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, dim, bias=False), nn.Identity()])
        self.norm_q = RMSNorm(dim_head, eps=eps)
        self.norm_k = RMSNorm(dim_head, eps=eps)

    def forward(
        self, x: torch.Tensor, plan: _BlockPlan, layer_cache: QwenImage21KVLayerCache | None = None
    ) -> torch.Tensor:
        """Tokens (B, L, D) -> (B, L, D), as `plan` says (the prefill, or the generated image over the cache)."""
        value = self.project_heads(self.to_v, None, x)  # (B, L, H, Dh)
        query = self.project_heads(self.to_q, self.norm_q, x).to(value.dtype)
        key = self.project_heads(self.to_k, self.norm_k, x).to(value.dtype)
        query, key = apply_rotary_complex(query, plan.rope), apply_rotary_complex(key, plan.rope)
        if layer_cache is not None and plan.kv_cache_mode == "extract":
            layer_cache.store(key[:, : plan.prefix_len].clone(), value[:, : plan.prefix_len].clone())
        elif layer_cache is not None and plan.kv_cache_mode == "cached":
            cached_key, cached_value = layer_cache.get()
            key, value = torch.cat([cached_key, key], dim=1), torch.cat([cached_value, value], dim=1)
        if plan.segments is None:
            out = attention(query, key, value, attn_mask=plan.attention_mask)
        else:
            out = torch.cat(_block_causal(query, key, value, plan.segments, plan.key_valid), dim=1)
        return self.to_out[0](out.type_as(query))


def _block_causal(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: Segments, key_valid: torch.Tensor | None
) -> list[torch.Tensor]:
    """Each prefix segment attends to every key before it and its own (a text segment causally over its own),
    the generated image to all keys; padded text keys are masked. Outputs (B, L_segment, H * Dh)."""
    outputs = []
    for start, end, is_text in segments:
        mask = None
        if is_text:
            length = end - start
            earlier = torch.ones(length, start, dtype=torch.bool, device=query.device)
            own = torch.tril(torch.ones(length, length, dtype=torch.bool, device=query.device))
            mask = torch.cat([earlier, own], dim=1)[None, None]
        if key_valid is not None:
            valid = key_valid[:, None, None, :end]
            mask = valid if mask is None else mask & valid
        outputs.append(attention(query[:, start:end], key[:, :end], value[:, :end], attn_mask=mask))
    prefix_len = segments[-1][1] if segments else 0
    valid = None if key_valid is None else key_valid[:, None, None, :]
    outputs.append(attention(query[:, prefix_len:], key, value, attn_mask=valid))
    return outputs


class QwenImage21SwiGLUFeedForward(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden_size: int) -> None:
        super().__init__()
        # Created in the reference's order, so that a seeded construction draws the same weights.
        self.proj = nn.Linear(hidden_size, mlp_hidden_size, bias=False)
        self.out = nn.Linear(mlp_hidden_size, hidden_size, bias=False)
        self.gate_layer = nn.Linear(hidden_size, mlp_hidden_size, bias=False)
        self.activation_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.activation_fn(self.gate_layer(x)) * self.proj(x))


def _scaled(x: torch.Tensor, params: torch.Tensor, target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x * (1 + scale), gate) from (N, 2D) modulation parameters."""
    scale, gate = params.chunk(2, dim=-1)
    return x * (1 + _rows_for_tokens(scale, target)), _rows_for_tokens(gate, target)


class QwenImage21TransformerBlock(nn.Module):
    """Norm, shared-modulation scale, attention and SwiGLU MLP, each added through a tanh gate."""

    def __init__(
        self, dim: int, num_attention_heads: int, attention_head_dim: int, mlp_ratio: int = 3, eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.attn = QwenImage21Attention(dim, num_attention_heads, attention_head_dim, eps)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.img_mlp = QwenImage21SwiGLUFeedForward(dim, dim * mlp_ratio)

    def forward(
        self,
        x: torch.Tensor,
        modulation: torch.Tensor,
        plan: _BlockPlan,
        layer_cache: QwenImage21KVLayerCache | None = None,
    ) -> torch.Tensor:
        """Joint tokens (B, L, D), modulation (N, 4D) -> (B, L, D)."""
        attn_params, mlp_params = modulation.chunk(2, dim=-1)
        modulated, gate = _scaled(self.img_norm1(x), attn_params, plan.target)
        x = x + gate.tanh() * self.attn(modulated, plan, layer_cache)
        modulated, gate = _scaled(self.img_norm2(x), mlp_params, plan.target)
        return clip_fp16(x + gate.tanh() * self.img_mlp(modulated))


class QwenImage21AdaLayerNormContinuous(nn.Module):
    """The final norm, scaled (no shift) by the timestep embedding."""

    def __init__(self, embedding_dim: int, conditioning_embedding_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(conditioning_embedding_dim, embedding_dim, bias=False)
        self.norm = nn.LayerNorm(embedding_dim, eps, elementwise_affine=False, bias=False)

    def forward(self, x: torch.Tensor, conditioning: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        scale = self.linear(self.silu(conditioning).to(x.dtype))
        return self.norm(x) * (1 + _rows_for_tokens(scale, target))


# ---- the model -------------------------------------------------------------------------------------------


class QwenImage21Transformer2DModel(ConfiguredModel, TeaCacheMixin):
    """The Qwen-Image-2.1 transformer (diffusers layout and keyword arguments) with TeaCache.

    Args:
        patch_size: latent patch folded into the channels (2.1 reads latents unpatched: 1).
        in_channels: channels of an input token; out_channels: of an output token (None: `in_channels`).
        num_layers: single-stream blocks.
        attention_head_dim: channels per head; must equal `sum(axes_dims_rope)`.
        num_attention_heads: heads.
        context_in_dim: width of the vision-language encoder's states.
        mlp_ratio: SwiGLU expansion factor.
        axes_dims_rope: RoPE channels of the (frame, row, column) axes.
        eps: epsilon of the norms.
        causal_condition: modulate the text and condition-image tokens at t = 0 (what makes `kv_cache` valid).

    TeaCache: the indicator is block 0's `img_norm1` output scaled by the shared modulation over the generated
    image's tokens; no fit is published (calibrate it). CFG branches keep separate state.
    """

    _no_split_modules: ClassVar[list[str]] = ["QwenImage21TransformerBlock"]
    _skip_layerwise_casting_patterns: ClassVar[list[str]] = ["pos_embed", "norm"]
    _repeated_blocks: ClassVar[list[str]] = ["QwenImage21TransformerBlock"]

    @register_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = 64,
        num_layers: int = 32,
        attention_head_dim: int = 128,
        num_attention_heads: int = 32,
        context_in_dim: int = 4096,
        mlp_ratio: int = 3,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        eps: float = 1e-6,
        causal_condition: bool = True,
    ) -> None:
        super().__init__()
        check_rope_axes("axes_dims_rope", axes_dims_rope, attention_head_dim, num_axes=3, minimum=0)
        self.out_channels = out_channels or in_channels
        self.inner_dim = num_attention_heads * attention_head_dim
        self.time_text_embed = QwenImage21TimestepProjEmbeddings(self.inner_dim)
        self.txt_in = QwenImage21TextProjection(context_in_dim, self.inner_dim, eps=eps)
        self.img_in = nn.Linear(in_channels * patch_size * patch_size, self.inner_dim, bias=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(self.inner_dim, 4 * self.inner_dim, bias=False))
        self.transformer_blocks = nn.ModuleList(
            [
                QwenImage21TransformerBlock(self.inner_dim, num_attention_heads, attention_head_dim, mlp_ratio, eps)
                for _ in range(num_layers)
            ]
        )
        self.norm_out = QwenImage21AdaLayerNormContinuous(self.inner_dim, self.inner_dim, eps=eps)
        self.proj_out = nn.Linear(self.inner_dim, patch_size * patch_size * self.out_channels, bias=False)

    @lora_scale_from("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        img_shapes: list[list[tuple[int, int, int]]] | None = None,
        img_mask: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        kv_cache: Any = None,
        kv_cache_mode: str | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict the flow of the generated image.

        Args:
            hidden_states: (B, L_img, in_channels) packed latents, condition images first, the generated one last.
            encoder_hidden_states: (B, L_vlm, context_in_dim) encoder states, one per slot of `img_mask` before
                the generated image's slots.
            timestep: (B,) sigmas in [0, 1] (scaled by 1000 inside), or one value for the batch.
            img_shapes: per sample, the (frames, height, width) token grid of each image (the first sample's is
                used for the batch, as the reference does).
            img_mask: (B, L_vlm + L_gen / 4) bool, True at image slots (the first row is used for the batch).
            encoder_hidden_states_mask: (B, L_vlm) mask of valid encoder tokens (padding is never attended to).
            attention_kwargs: None, or only a LoRA `scale`.
            kv_cache: a `QwenImage21KVCache` of the prefix's keys and values, with `kv_cache_mode` "extract" (fill
                it: the first step) or "cached" (read it: only the generated image's tokens run).
            return_dict: return a `Transformer2DModelOutput` instead of a tuple.

        Returns:
            (B, L, out_channels) per token of the joint sequence ("cached": of the generated image only); the
            generated image's are the last L_img_gen.
        """
        batch = self._check_inputs(
            hidden_states, encoder_hidden_states, timestep, img_shapes, img_mask, encoder_hidden_states_mask
        )
        check_attention_kwargs("attention_kwargs", attention_kwargs)
        self._check_cache(kv_cache, kv_cache_mode)
        device = hidden_states.device
        hidden_states = self.img_in(hidden_states)  # (B, Li, D)
        text = self.txt_in(encoder_hidden_states)  # (B, Lt, D)
        shapes = [tuple(shape) for shape in img_shapes[0]]
        repeats = torch.where(img_mask, _TOKENS_PER_SLOT, 1)[0]
        is_image = torch.repeat_interleave(img_mask[0], repeats)  # (L,) over the joint sequence
        target_slots = math.prod(shapes[-1]) // _TOKENS_PER_SLOT
        joint = torch.cat([text, text.new_zeros(batch, target_slots, text.shape[2])], dim=1)
        joint = joint.repeat_interleave(repeats, dim=1)
        joint[:, is_image] = hidden_states  # (B, L, D)
        rope = _rope_factors(tuple(self.config.axes_dims_rope), shapes, is_image)
        ids, target = _token_blocks(is_image, shapes)

        timestep = batch_vector("timestep", timestep, batch, device).to(hidden_states.dtype)
        if self.config.causal_condition:
            timestep = torch.cat([timestep, timestep.new_zeros(1)])  # the last row: t = 0, for the prefix
        else:
            target = None
        temb = self.time_text_embed(timestep, hidden_states.dtype)  # (N, D)
        modulation = self.modulation(temb)  # (N, 4D), shared by every block

        key_valid = None
        if encoder_hidden_states_mask is not None:
            key_valid = torch.ones(batch, is_image.shape[0], dtype=torch.bool, device=device)
            text_slots = ~img_mask[0][: encoder_hidden_states_mask.shape[1]]
            key_valid[:, (~is_image).nonzero(as_tuple=True)[0]] = encoder_hidden_states_mask.bool()[:, text_slots]
        prefix_len = int((~_token_blocks(is_image, shapes)[1]).sum())
        if kv_cache_mode == "cached":
            joint, rope, target = joint[:, prefix_len:], rope[prefix_len:], target[prefix_len:]
            attention_mask = None if key_valid is None else key_valid[:, None, None, :]
            segments, key_valid = None, None
        else:
            attention_mask, segments = None, _prefix_segments(ids, prefix_len)

        plan = _BlockPlan(target, rope, attention_mask, segments, key_valid, kv_cache_mode, prefix_len)
        joint = self.run_blocks(joint, modulation=modulation, plan=plan, kv_cache=kv_cache)  # (B, L, D)
        output = self.proj_out(self.norm_out(joint, temb, target))
        return (output,) if not return_dict else Transformer2DModelOutput(sample=output)

    # ---- TeaCache seam ----------------------------------------------------------------------------

    def teacache_indicator(
        self, hidden_states: torch.Tensor, modulation: torch.Tensor, plan: _BlockPlan, **_: Any
    ) -> torch.Tensor:
        """Block 0's `img_norm1` output scaled by the modulation, over the generated image's tokens: (B, Lg, D)."""
        if not len(self.transformer_blocks):
            return hidden_states
        attn_params = modulation.chunk(2, dim=-1)[0]
        modulated, _ = _scaled(self.transformer_blocks[0].img_norm1(hidden_states), attn_params, plan.target)
        if plan.target is None:
            return modulated
        return modulated[:, plan.target]

    def forward_blocks(
        self,
        hidden_states: torch.Tensor,
        modulation: torch.Tensor,
        plan: _BlockPlan,
        kv_cache: QwenImage21KVCache | None,
    ) -> torch.Tensor:
        """The single-stream blocks: joint tokens (B, L, D) -> (B, L, D)."""
        for index, block in enumerate(self.transformer_blocks):
            layer_cache = kv_cache.get_layer(index) if kv_cache is not None else None
            hidden_states = self.call_block(block, hidden_states, modulation, plan, layer_cache)
        return hidden_states

    # ---- input validation -------------------------------------------------------------------------

    def _check_inputs(
        self,
        hidden_states: Any,
        encoder_hidden_states: Any,
        timestep: Any,
        img_shapes: Any,
        img_mask: Any,
        mask: Any,
    ) -> int:
        config = self.config
        check_tokens("hidden_states", hidden_states, None, config.in_channels * config.patch_size**2)
        batch, image_len = hidden_states.shape[:2]
        if batch == 0:
            raise ValueError(f"hidden_states must hold at least one sample, got shape {tuple(hidden_states.shape)}")
        check_dtype("hidden_states", hidden_states, self.img_in.weight.dtype)
        check_tokens("encoder_hidden_states", encoder_hidden_states, batch, config.context_in_dim)
        if not isinstance(timestep, torch.Tensor):
            raise TypeError(f"timestep is required: a tensor of shape ({batch},) or (), got {type(timestep).__name__}")
        shapes = _check_img_shapes(img_shapes, batch, image_len)
        text_len = encoder_hidden_states.shape[1]
        target_slots = math.prod(shapes[-1]) // _TOKENS_PER_SLOT
        if not isinstance(img_mask, torch.Tensor) or img_mask.dtype != torch.bool or img_mask.ndim != 2:
            raise TypeError(
                f"img_mask must be a bool tensor of shape ({batch}, {text_len + target_slots}) (True at image slots), "
                f"got {img_mask if not isinstance(img_mask, torch.Tensor) else (img_mask.dtype, tuple(img_mask.shape))}"
            )
        if img_mask.shape[1] != text_len + target_slots or img_mask.shape[0] != batch:
            raise ValueError(
                f"img_mask must have shape ({batch}, {text_len + target_slots}): one slot per encoder token and "
                f"{target_slots} for the generated image's 2x2 token groups, got {tuple(img_mask.shape)}"
            )
        slots = int(img_mask[0].sum())
        if slots * _TOKENS_PER_SLOT != image_len or math.prod(shapes[-1]) % _TOKENS_PER_SLOT:
            raise ValueError(
                f"img_mask's first row has {slots} image slots ({slots * _TOKENS_PER_SLOT} tokens), but "
                f"hidden_states has {image_len} image tokens"
            )
        if not bool(img_mask[0, text_len:].all()):
            raise ValueError("img_mask must end with the generated image's slots (all True after the encoder tokens)")
        if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, text_len)):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"encoder_hidden_states_mask must be None or a ({batch}, {text_len}) tensor, got {shape}")
        return batch

    def _check_cache(self, kv_cache: Any, mode: str | None) -> None:
        if kv_cache is not None and not self.config.causal_condition:
            raise ValueError(
                "kv_cache needs causal_condition=True: only then are the prefix's keys and values the same at "
                "every step"
            )
        if kv_cache is not None and mode not in ("extract", "cached"):
            raise ValueError(f"kv_cache_mode must be 'extract' or 'cached' when kv_cache is given, got {mode!r}")
        if kv_cache is None and mode is not None:
            raise ValueError(f"kv_cache_mode is {mode!r} but no kv_cache was given to hold the prefix")


def _check_img_shapes(img_shapes: Any, batch: int, image_len: int) -> list[tuple[int, int, int]]:
    """The first sample's image grids, checked: a list per sample of (frames, height, width) tuples."""
    allowed = f"a list of {batch} lists of (frames, height, width) tuples of positive ints"
    if not isinstance(img_shapes, list | tuple) or len(img_shapes) not in (1, batch) or not img_shapes[0]:
        raise ValueError(f"img_shapes must be {allowed}, got {img_shapes!r}")
    first = img_shapes[0]
    valid = isinstance(first, list | tuple) and all(
        isinstance(s, list | tuple) and len(s) == 3 and all(isinstance(n, int) and n >= 1 for n in s) for s in first
    )
    if not valid:
        raise ValueError(f"img_shapes must be {allowed}, got {img_shapes!r}")
    if sum(math.prod(s) for s in first) != image_len:
        raise ValueError(
            f"img_shapes describes {sum(math.prod(s) for s in first)} image tokens, but hidden_states has {image_len}"
        )
    return [tuple(s) for s in first]
