"""Qwen-Image: the native transformer, with TeaCache on its block stack and per-branch true CFG.

Architecture, parameter names and numerics follow diffusers' `QwenImageTransformer2DModel`: RMS-normed
text states and packed image tokens are embedded separately, pass `num_layers` dual-stream blocks (text
first in the joint attention, padded text keys masked out), and the image part goes through the final
AdaLN and projection. Positions are complex RoPE factors: image tokens get centred (row, column)
positions and a frame index per image, text tokens continue on all three axes after the largest image
half-size. TeaCache skips the whole block stack; its indicator is block 0's `img_mod`-modulated
`img_norm1` output.

The optional variants of later checkpoints are implemented as diffusers does: `zero_cond_t` (edit
models: the reference images after the first image are modulated with the embedding of t = 0),
`use_additional_t_cond` (a learned two-entry embedding added to the timestep embedding) and
`use_layer3d_rope` (layered models: the last image of each sample is the condition image at frame -1).
"""

from __future__ import annotations

import functools
import math
import operator
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from ..cache.mixin import Deferred, TeaCacheMixin
from ..checks import (
    batch_vector,
    check_attention_kwargs,
    check_dtype,
    check_rope_axes,
    check_tokens,
    controlnet_residuals,
)
from ..layers.attention import MultiHeadAttentionBase, attention
from ..layers.embeddings import MLPEmbedder, timestep_sinusoids
from ..layers.feedforward import FeedForward
from ..layers.normalization import AdaLayerNormContinuous, RMSNorm
from ..layers.precision import clip_fp16
from ..layers.rope import apply_rotary_complex
from ..lora import lora_scale_from
from .base import ConfiguredModel, Transformer2DModelOutput, register_config

__all__ = ["QwenImageTransformer2DModel"]

_TIMESTEP_FEATURES = 256
_ROPE_THETA = 10000
# The reference precomputes factors for positions -4096..4095 only; positions outside fail there.
_ROPE_POSITIONS = 4096

Rope = tuple[torch.Tensor, torch.Tensor]  # complex factors: image (L_img, Dh / 2), text (L_txt, Dh / 2)
ImageLayout = tuple[tuple[int, int, int], ...]  # one sample's images as (frames, height, width) in tokens


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift with (B, 1 or L, D) modulation on (B, L, D) tokens."""
    return x * (1 + scale) + shift


# ---- rotary positions ------------------------------------------------------------------------------


@functools.cache
def _axis_factors(dim: int) -> torch.Tensor:
    """Complex64 unit factors (2 * 4096, dim / 2) of positions -4096..4095 on one axis, on the CPU.

    Computed on the CPU as two 4096-row halves, as the reference does, so that every device receives
    bit-identical factors (sin/cos kernels differ between devices and between vector widths).
    """
    inverse_frequencies = 1.0 / torch.pow(_ROPE_THETA, torch.arange(0, dim, 2).to(torch.float32).div(dim))
    halves = []
    for positions in (torch.arange(-_ROPE_POSITIONS, 0), torch.arange(_ROPE_POSITIONS)):
        angles = torch.outer(positions, inverse_frequencies)  # (4096, dim / 2) float32
        halves.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(halves)  # row p + 4096 holds position p


def _centred(size: int) -> torch.Tensor:
    """Positions of `size` tokens centred on 0, the extra token of an odd size on the negative side."""
    return torch.arange(size) - (size - size // 2)


def _image_positions(layout: ImageLayout, layer3d: bool) -> tuple[torch.Tensor, int]:
    """Integer (L_img, 3) (frame, row, column) positions of one sample's images, and the first text position.

    Image i's frames start at frame position i. With `layer3d` the last image is the condition image, put
    at frame position -1; the text then starts after the layer count as well.
    """
    per_image = []
    text_start = 0
    for index, (frames, height, width) in enumerate(layout):
        if layer3d and index == len(layout) - 1:
            frame_positions = torch.tensor([-1])
        else:
            frame_positions = torch.arange(index, index + frames)
        grid = torch.meshgrid(frame_positions, _centred(height), _centred(width), indexing="ij")
        per_image.append(torch.stack(grid, dim=-1).reshape(-1, 3))  # (F * H * W, 3)
        text_start = max(text_start, height // 2, width // 2)
    if layer3d:
        text_start = max(text_start, len(layout) - 1)
    return torch.cat(per_image), text_start


@functools.lru_cache(maxsize=64)
def _rope_factors(
    axes_dims: tuple[int, int, int], layout: ImageLayout, text_len: int, layer3d: bool, device: torch.device
) -> Rope:
    image_positions, text_start = _image_positions(layout, layer3d)
    lowest, highest = int(image_positions.min()), max(int(image_positions.max()), text_start + text_len - 1)
    if lowest < -_ROPE_POSITIONS or highest >= _ROPE_POSITIONS:
        raise ValueError(
            f"img_shapes {list(layout)} with {text_len} text tokens need RoPE positions {lowest}..{highest}; "
            f"Qwen-Image's rotary tables cover positions {-_ROPE_POSITIONS}..{_ROPE_POSITIONS - 1}"
        )
    text_positions = torch.arange(text_start, text_start + text_len)
    tables = [_axis_factors(dim) for dim in axes_dims]
    image = torch.cat([t[image_positions[:, axis] + _ROPE_POSITIONS] for axis, t in enumerate(tables)], dim=1)
    text = torch.cat([t[text_positions + _ROPE_POSITIONS] for t in tables], dim=1)
    return image.to(device), text.to(device)  # (L_img, Dh / 2), (L_txt, Dh / 2)


# ---- layers ------------------------------------------------------------------------------------------


class QwenTimestepProjEmbeddings(nn.Module):
    """Timestep embedding (+ the learned `additional_t_cond` embedding of layered checkpoints)."""

    def __init__(self, embedding_dim: int, use_additional_t_cond: bool = False) -> None:
        super().__init__()
        self.timestep_embedder = MLPEmbedder(_TIMESTEP_FEATURES, embedding_dim)
        self.addition_t_embedding = nn.Embedding(2, embedding_dim) if use_additional_t_cond else None

    def forward(
        self, timestep: torch.Tensor, dtype: torch.dtype, additional_t_cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Sigmas (N,) in [0, 1] (scaled by 1000 inside the sinusoid) -> (N, D) conditioning."""
        features = timestep_sinusoids(timestep, _TIMESTEP_FEATURES, flip_sin_to_cos=True, scale=1000)
        conditioning = self.timestep_embedder(features.to(dtype))
        if self.addition_t_embedding is not None:
            conditioning = conditioning + self.addition_t_embedding(additional_t_cond).to(dtype)
        return conditioning


class QwenImageJointAttention(MultiHeadAttentionBase):
    """Joint text+image attention with RMS-normalised queries and keys and complex RoPE."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, eps: float = 1e-6) -> None:
        super().__init__(num_heads, head_dim)
        inner_dim = self.inner_dim
        # Submodules are created in diffusers' order (its `Attention` makes the text projections k, v, q),
        # so that a seeded construction draws the same weights and the state_dict keys come in its order.
        self.norm_q = RMSNorm(head_dim, eps=eps)
        self.norm_k = RMSNorm(head_dim, eps=eps)
        self.to_q = nn.Linear(dim, inner_dim)
        self.to_k = nn.Linear(dim, inner_dim)
        self.to_v = nn.Linear(dim, inner_dim)
        self.add_k_proj = nn.Linear(dim, inner_dim)
        self.add_v_proj = nn.Linear(dim, inner_dim)
        self.add_q_proj = nn.Linear(dim, inner_dim)
        # Index 1 (dropout at training time) holds no weights; it keeps the key `to_out.0`.
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, dim), nn.Identity()])
        self.to_add_out = nn.Linear(inner_dim, dim)
        self.norm_added_q = RMSNorm(head_dim, eps=eps)
        self.norm_added_k = RMSNorm(head_dim, eps=eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        rope: Rope,
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (B, Li, D) and text (B, Lt, D) tokens -> projected image and text outputs."""
        image_rope, text_rope = rope
        q = torch.cat(
            [
                apply_rotary_complex(
                    self.project_heads(self.add_q_proj, self.norm_added_q, encoder_hidden_states), text_rope
                ),
                apply_rotary_complex(self.project_heads(self.to_q, self.norm_q, hidden_states), image_rope),
            ],
            dim=1,
        )  # (B, Lt + Li, H, Dh)
        k = torch.cat(
            [
                apply_rotary_complex(
                    self.project_heads(self.add_k_proj, self.norm_added_k, encoder_hidden_states), text_rope
                ),
                apply_rotary_complex(self.project_heads(self.to_k, self.norm_k, hidden_states), image_rope),
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
        out = attention(q, k, v, attn_mask=attention_mask)  # (B, Lt + Li, H * Dh)
        text_len = encoder_hidden_states.shape[1]
        return self.to_out[0](out[:, text_len:].contiguous()), self.to_add_out(out[:, :text_len].contiguous())


Modulation = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # shift, scale, gate: (B, 1 or L, D) each


def _split_modulation(params: torch.Tensor, condition_tokens: torch.Tensor | None) -> Modulation:
    """(N, 3D) AdaLN parameters -> per-token shift, scale, gate.

    With `condition_tokens` ((B, L, 1) bool, the zero_cond_t mode) the parameters hold two halves: rows
    of the real timestep, then rows of t = 0 for the reference-image tokens.
    """
    shift, scale, gate = params.chunk(3, dim=-1)
    if condition_tokens is None:
        return shift[:, None], scale[:, None], gate[:, None]
    half = params.shape[0] // 2

    def per_token(x: torch.Tensor) -> torch.Tensor:
        return torch.where(condition_tokens, x[half:, None], x[:half, None])  # (B, L, D)

    return per_token(shift), per_token(scale), per_token(gate)


class BlockInputs(NamedTuple):
    """What every block reads besides the image and text streams: the conditioning (N, D), the rotary factors,
    the text keys' mask, and under `zero_cond_t` the (B, Li, 1) mask of the reference-image tokens (modulated at
    t = 0)."""

    temb: torch.Tensor
    rope: Rope
    attention_mask: torch.Tensor | None = None
    condition_tokens: torch.Tensor | None = None


class QwenImageTransformerBlock(nn.Module):
    """Dual-stream block: separate AdaLN and MLP per stream, one joint attention."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.attn = QwenImageJointAttention(dim, num_attention_heads, attention_head_dim, eps)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.img_mlp = FeedForward(dim, dim, activation_fn="gelu-approximate")
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.txt_mlp = FeedForward(dim, dim, activation_fn="gelu-approximate")

    def image_modulation(
        self, temb: torch.Tensor, condition_tokens: torch.Tensor | None
    ) -> tuple[Modulation, Modulation]:
        """The image stream's (attention, MLP) modulations."""
        attn_params, mlp_params = self.img_mod(temb).chunk(2, dim=-1)
        return _split_modulation(attn_params, condition_tokens), _split_modulation(mlp_params, condition_tokens)

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, inputs: BlockInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (B, Li, D), text (B, Lt, D) -> updated image, text."""
        temb, condition_tokens = inputs.temb, inputs.condition_tokens
        (shift1, scale1, gate1), (shift2, scale2, gate2) = self.image_modulation(temb, condition_tokens)
        # Under zero_cond_t the text stream is modulated by the real timestep only (the first half).
        text_temb = temb.chunk(2, dim=0)[0] if condition_tokens is not None else temb
        text_attn_params, text_mlp_params = self.txt_mod(text_temb).chunk(2, dim=-1)
        c_shift1, c_scale1, c_gate1 = _split_modulation(text_attn_params, None)
        c_shift2, c_scale2, c_gate2 = _split_modulation(text_mlp_params, None)

        attn_x, attn_c = self.attn(
            _modulate(self.img_norm1(hidden_states), shift1, scale1),
            _modulate(self.txt_norm1(encoder_hidden_states), c_shift1, c_scale1),
            inputs.rope,
            inputs.attention_mask,
        )
        hidden_states = hidden_states + gate1 * attn_x
        encoder_hidden_states = encoder_hidden_states + c_gate1 * attn_c

        hidden_states = hidden_states + gate2 * self.img_mlp(_modulate(self.img_norm2(hidden_states), shift2, scale2))
        ff_c = self.txt_mlp(_modulate(self.txt_norm2(encoder_hidden_states), c_shift2, c_scale2))
        encoder_hidden_states = encoder_hidden_states + c_gate2 * ff_c
        return clip_fp16(hidden_states), clip_fp16(encoder_hidden_states)


# ---- input normalisation -------------------------------------------------------------------------


def _shape_triple(value: Any) -> tuple[int, int, int] | None:
    """(frames, height, width) of positive ints, or None when `value` is not a sequence of three ints."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or len(value) != 3:
        return None
    sizes = []
    for size in value:
        if isinstance(size, bool):
            return None
        try:
            sizes.append(operator.index(size))
        except TypeError:
            return None
    return tuple(sizes) if min(sizes) >= 1 else None


def _image_layouts(img_shapes: Any, batch: int, image_len: int, layer3d: bool) -> list[ImageLayout]:
    """Normalise `img_shapes` to one tuple of (frames, height, width) per sample and check it."""
    allowed = (
        "a list with one entry per sample (or one entry for all), each entry a (frames, height, width) "
        "tuple of positive ints or a list of such tuples (the generated image first, then reference images)"
    )
    if img_shapes is None:
        raise ValueError(f"img_shapes is required: {allowed}")
    if _shape_triple(img_shapes) is not None:
        entries = [img_shapes]
    elif isinstance(img_shapes, str | bytes) or not isinstance(img_shapes, Sequence) or not img_shapes:
        raise ValueError(f"img_shapes must be {allowed}; got {img_shapes!r}")
    else:
        entries = list(img_shapes)
    if len(entries) not in (1, batch):
        raise ValueError(f"img_shapes has {len(entries)} entries for a batch of {batch}; it must be {allowed}")
    layouts = []
    for entry in entries:
        single = _shape_triple(entry)
        if single is not None:
            layout = (single,)
        elif isinstance(entry, str | bytes) or not isinstance(entry, Sequence) or not entry:
            raise ValueError(f"img_shapes must be {allowed}; got entry {entry!r}")
        else:
            layout = tuple(_shape_triple(shape) for shape in entry)
            if None in layout:
                raise ValueError(f"img_shapes must be {allowed}; got entry {entry!r}")
        if layer3d and layout[-1][0] != 1:
            raise ValueError(
                f"img_shapes entry {list(layout)}: with use_layer3d_rope=True the last image of a sample is the "
                f"condition image and must have exactly 1 frame, got {layout[-1][0]}"
            )
        tokens = sum(math.prod(shape) for shape in layout)
        if tokens != image_len:
            raise ValueError(
                f"img_shapes entry {list(layout)} describes {tokens} image tokens, but hidden_states has "
                f"{image_len}: the sum of frames * height * width must equal the token count"
            )
        layouts.append(layout)
    return layouts * batch if len(layouts) == 1 else layouts


def _condition_token_mask(layouts: list[ImageLayout], device: torch.device) -> torch.Tensor:
    """(B, L_img, 1) bool: True on the tokens of every image after each sample's first."""
    rows = []
    for layout in layouts:
        first = math.prod(layout[0])
        rows.append([False] * first + [True] * sum(math.prod(shape) for shape in layout[1:]))
    return torch.tensor(rows, dtype=torch.bool, device=device)[..., None]


class QwenImageTransformer2DModel(ConfiguredModel, TeaCacheMixin):
    """The Qwen-Image transformer (diffusers layout and keyword arguments) with TeaCache.

    Args:
        patch_size: patch size of the output projection (the pipeline packs 2x2 latents into tokens).
        in_channels: channels of an image token.
        out_channels: channels predicted per patch pixel (None: `in_channels`).
        num_layers: dual-stream blocks.
        attention_head_dim: channels per head; must equal `sum(axes_dims_rope)`.
        num_attention_heads: heads.
        joint_attention_dim: width of the text encoder states.
        guidance_embeds: accepted for config compatibility; the model builds no guidance embedder.
        axes_dims_rope: RoPE channels of the (frame, row, column) axes.
        zero_cond_t: modulate the tokens of every image after the first with the embedding of t = 0.
        use_additional_t_cond: add a learned embedding of `additional_t_cond` (0 or 1) to the timestep's.
        use_layer3d_rope: layered RoPE: the last image of each sample is the condition image.

    TeaCache: the indicator is block 0's `img_norm1` output modulated by its `img_mod` shift and scale
    (the zoo entry `qwen-image` holds a community fit for it, not an official one). CFG branches keep
    separate state, so TeaCache stays on under true CFG.
    """

    _no_split_modules: ClassVar[list[str]] = ["QwenImageTransformerBlock"]
    _skip_layerwise_casting_patterns: ClassVar[list[str]] = ["pos_embed", "norm"]
    _repeated_blocks: ClassVar[list[str]] = ["QwenImageTransformerBlock"]

    # Per-sample TeaCache gathers these by batch row; the rotary factors are shared. With condition tokens
    # (`zero_cond_t`) `temb` holds two rows per sample, and per-sample state is refused.
    teacache_row_inputs = frozenset(
        {"encoder_hidden_states", "temb", "attention_mask", "condition_tokens", "controlnet_block_samples"}
    )

    @register_config
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 64,
        out_channels: int | None = 16,
        num_layers: int = 60,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 3584,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        zero_cond_t: bool = False,
        use_additional_t_cond: bool = False,
        use_layer3d_rope: bool = False,
    ) -> None:
        super().__init__()
        # An axis of 0 channels is allowed, as in diffusers: that axis then has no effect.
        check_rope_axes("axes_dims_rope", axes_dims_rope, attention_head_dim, num_axes=3, minimum=0)
        self.out_channels = out_channels or in_channels
        self.inner_dim = num_attention_heads * attention_head_dim

        self.time_text_embed = QwenTimestepProjEmbeddings(self.inner_dim, use_additional_t_cond)
        self.txt_norm = RMSNorm(joint_attention_dim, eps=1e-6)
        self.img_in = nn.Linear(in_channels, self.inner_dim)
        self.txt_in = nn.Linear(joint_attention_dim, self.inner_dim)
        self.transformer_blocks = nn.ModuleList(
            [
                QwenImageTransformerBlock(self.inner_dim, num_attention_heads, attention_head_dim)
                for _ in range(num_layers)
            ]
        )
        self.norm_out = AdaLayerNormContinuous(self.inner_dim, self.inner_dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(self.inner_dim, patch_size * patch_size * self.out_channels)

    @lora_scale_from("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        img_shapes: list[list[tuple[int, int, int]]] | None = None,
        guidance: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples: list[torch.Tensor] | None = None,
        additional_t_cond: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict the flow for packed image tokens.

        Args:
            hidden_states: (B, L_img, in_channels) packed latent tokens (all images of a sample joined).
            encoder_hidden_states: (B, L_txt, joint_attention_dim) text encoder states, or (1, ...) without a mask:
                one text for the whole batch (broadcast, as diffusers' true CFG passes its negative prompt).
            encoder_hidden_states_mask: (B, L_txt) text mask, True (or nonzero) for valid tokens; any pattern.
            timestep: (B,) sigmas in [0, 1] (scaled by 1000 inside), or one value for the batch.
            img_shapes: per sample, the (frames, height, width) token grid of each of its images, in the order
                of `hidden_states` (e.g. `[[(1, 32, 48)]] * B`; edit models add reference images). RoPE uses
                the first sample's layout for the whole batch, as the reference does.
            guidance: must be None (the model has no guidance embedder).
            attention_kwargs: None, or only a LoRA `scale`, which multiplies the adapters' weights for this call.
            controlnet_block_samples: residuals added to the image stream after the blocks: a list (or a
                stacked tensor) of tensors that broadcast to (B, L_img, D); ignored when num_layers is 0.
            additional_t_cond: (B,) long, 0 or 1; required exactly when `use_additional_t_cond`.
            return_dict: return a `Transformer2DModelOutput` instead of a tuple.

        Returns:
            (B, L_img, patch_size**2 * out_channels) prediction, in a tuple or output object.
        """
        batch, image_len, text_len, layouts = self._check_inputs(
            hidden_states, encoder_hidden_states, encoder_hidden_states_mask, img_shapes, guidance, attention_kwargs
        )
        config = self.config
        device = hidden_states.device

        timestep = batch_vector("timestep", timestep, batch, device)
        self._check_additional_t_cond(additional_t_cond, timestep.shape[0] * (2 if config.zero_cond_t else 1), batch)

        hidden_states = self.img_in(hidden_states)  # (B, Li, D)
        dtype = hidden_states.dtype
        controlnet_block_samples = controlnet_residuals(
            "controlnet_block_samples", controlnet_block_samples, self.transformer_blocks, hidden_states
        )
        timestep = timestep.to(dtype)
        condition_tokens = None
        if config.zero_cond_t:
            timestep = torch.cat([timestep, timestep * 0])
            condition_tokens = _condition_token_mask(layouts, device)  # (B, Li, 1)
        temb = self.time_text_embed(timestep, dtype, additional_t_cond)  # (N, D): N timestep rows, x2 by zero_cond_t
        text = encoder_hidden_states

        attention_mask = None
        if encoder_hidden_states_mask is not None:
            image_keys = torch.ones(batch, image_len, dtype=torch.bool, device=device)
            attention_mask = torch.cat([encoder_hidden_states_mask.to(torch.bool), image_keys], dim=1)
            attention_mask = attention_mask[:, None, None, :]  # (B, 1, 1, Lt + Li)
        if any(layout != layouts[0] for layout in layouts):
            warnings.warn(
                f"img_shapes differ between samples ({[list(layout) for layout in layouts]}); RoPE uses the first "
                "sample's layout for the whole batch, as diffusers does, which is wrong for the others",
                UserWarning,
                stacklevel=2,
            )
        layout = layouts[0]

        def rope() -> torch.Tensor:
            return _rope_factors(tuple(config.axes_dims_rope), layout, text_len, config.use_layer3d_rope, device)

        # Only the blocks read the projected text and the rotary factors: a skipped step computes neither.
        hidden_states = self.run_blocks(
            hidden_states,
            encoder_hidden_states=Deferred(lambda: self.txt_in(self.txt_norm(text)), (text,)),  # (B, Lt, D)
            temb=temb,
            rope=Deferred(rope, (text.shape[1], layout)),  # a new layout of as many tokens needs new factors
            attention_mask=attention_mask,
            condition_tokens=condition_tokens,
            controlnet_block_samples=controlnet_block_samples,
        )  # (B, Li, D)

        if condition_tokens is not None:
            temb = temb.chunk(2, dim=0)[0]
        output = self.proj_out(self.norm_out(hidden_states, temb))
        return (output,) if not return_dict else Transformer2DModelOutput(sample=output)

    # ---- TeaCache seam ----------------------------------------------------------------------------

    def teacache_indicator(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        condition_tokens: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        """Block 0's `img_norm1` output modulated by its `img_mod` shift and scale: (B, Li, D)."""
        if not len(self.transformer_blocks):
            return hidden_states
        block = self.transformer_blocks[0]
        (shift, scale, _gate), _ = block.image_modulation(temb, condition_tokens)
        return _modulate(block.img_norm1(hidden_states), shift, scale)

    def forward_blocks(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rope: Rope,
        attention_mask: torch.Tensor | None = None,
        condition_tokens: torch.Tensor | None = None,
        controlnet_block_samples: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The dual-stream blocks: image (B, Li, D) -> image (B, Li, D)."""
        if controlnet_block_samples:
            interval = math.ceil(len(self.transformer_blocks) / len(controlnet_block_samples))
        inputs = BlockInputs(temb, rope, attention_mask, condition_tokens)
        for index, block in enumerate(self.transformer_blocks):
            hidden_states, encoder_hidden_states = self.call_block(block, hidden_states, encoder_hidden_states, inputs)
            if controlnet_block_samples:
                hidden_states = hidden_states + controlnet_block_samples[index // interval]
        return hidden_states

    # ---- input validation -------------------------------------------------------------------------

    def _check_inputs(
        self,
        hidden_states: Any,
        encoder_hidden_states: Any,
        encoder_hidden_states_mask: Any,
        img_shapes: Any,
        guidance: Any,
        attention_kwargs: dict[str, Any] | None,
    ) -> tuple[int, int, int, list[ImageLayout]]:
        config = self.config
        check_tokens("hidden_states", hidden_states, None, config.in_channels)
        batch, image_len = hidden_states.shape[:2]
        if batch == 0:
            raise ValueError(f"hidden_states must hold at least one sample, got shape {tuple(hidden_states.shape)}")
        check_dtype("hidden_states", hidden_states, self.img_in.weight.dtype)
        # One sample's text may stand for the whole batch (without a mask), as in diffusers (its true CFG's negative
        # prompt).
        check_tokens("encoder_hidden_states", encoder_hidden_states, batch, config.joint_attention_dim, broadcast=True)
        self._check_text_dtype(encoder_hidden_states)
        text_len = encoder_hidden_states.shape[1]
        if text_len == 0:
            raise ValueError("encoder_hidden_states must hold at least one text token, got shape (B, 0, D)")
        mask = encoder_hidden_states_mask
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(
                    f"encoder_hidden_states_mask must be None or a tensor of shape ({batch}, {text_len}), "
                    f"got {type(mask).__name__}"
                )
            if tuple(mask.shape) != (batch, text_len):
                raise ValueError(
                    f"encoder_hidden_states_mask must have shape ({batch}, {text_len}) (batch, text length of "
                    f"encoder_hidden_states), got {tuple(mask.shape)}"
                )
            if encoder_hidden_states.shape[0] != batch:
                raise ValueError(
                    f"encoder_hidden_states of batch 1 stands for all {batch} samples only without a mask: with "
                    f"encoder_hidden_states_mask give one text per sample, ({batch}, {text_len}, D)"
                )
        if guidance is not None:
            raise ValueError(
                "guidance must be None: QwenImageTransformer2DModel has no guidance embedder (diffusers builds "
                "none either, whatever guidance_embeds says)"
            )
        check_attention_kwargs("attention_kwargs", attention_kwargs)
        layouts = _image_layouts(img_shapes, batch, image_len, config.use_layer3d_rope)
        return batch, image_len, text_len, layouts

    def _check_text_dtype(self, text: torch.Tensor) -> None:
        """The text must reach `txt_in` in its dtype. `txt_norm` returns its weight's dtype when that is half
        precision and the promoted dtype otherwise, so, as in diffusers, half-precision text is accepted by
        a float32 model, but not float64 text."""
        weight = self.txt_norm.weight
        normed = (
            weight.dtype
            if weight.dtype in (torch.float16, torch.bfloat16)
            else torch.promote_types(text.dtype, weight.dtype)
        )
        if normed != self.txt_in.weight.dtype and not torch.is_autocast_enabled(text.device.type):
            raise TypeError(
                f"encoder_hidden_states of dtype {text.dtype} does not fit the model's dtype "
                f"{self.txt_in.weight.dtype}; cast it with .to()"
            )

    def _check_additional_t_cond(self, value: Any, rows: int, batch: int) -> None:
        """`rows`: the timestep rows the embedding is added to (doubled under zero_cond_t); it broadcasts."""
        if not self.config.use_additional_t_cond:
            if value is not None:
                raise ValueError("additional_t_cond must be None: this model has use_additional_t_cond=False")
            return
        # One shared timestep row broadcasts against per-sample conditions, as in the reference.
        lengths = sorted({1, rows, batch} if rows == 1 else {1, rows})
        allowed = "(), " + " or ".join(f"({n},)" for n in lengths)
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"additional_t_cond is required (use_additional_t_cond=True): an integer tensor of shape {allowed} "
                f"holding 0 or 1, got {type(value).__name__}"
            )
        if value.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"additional_t_cond must be an int64 or int32 tensor, got {value.dtype}")
        if value.ndim > 1 or (value.ndim == 1 and value.shape[0] not in lengths):
            raise ValueError(f"additional_t_cond must have shape {allowed}, got {tuple(value.shape)}")
        if bool(((value < 0) | (value > 1)).any()):
            raise ValueError(f"additional_t_cond values must be 0 or 1, got {value.tolist()}")
