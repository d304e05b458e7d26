"""HunyuanVideo-1.5 (T2V and I2V, 480p and 720p): the native transformer, with TeaCache on its block stack.

Architecture, parameter names and numerics follow diffusers' `HunyuanVideo15Transformer3DModel`. It is
HunyuanVideo without the single-stream blocks and without pooled text or guidance embeddings: the
latent video (noisy latents, the conditioning frame's latents and a mask on the channel axis) is cut
into 3-D patches; three conditioning streams are embedded and joined into one "text" stream:

- the Qwen2.5-VL states through HunyuanVideo's token refiner,
- the ByT5 states of the glyph text (the quoted words of the prompt) through a small MLP,
- the SigLIP tokens of the conditioning image (I2V) through an image projection; text-to-video passes
  zeros, which the model recognises and masks out,

each tagged with a learned type embedding. Per sample the valid tokens of the three streams come first
(image, glyph, text), then the padding, so the attention mask only needs each sample's count of valid
tokens. Then `num_layers` dual-stream blocks of HunyuanVideo run over image tokens followed by that
stream, and the image part goes through the final AdaLN and projection. TeaCache skips the blocks; its
indicator is block 0's modulated image input, as for HunyuanVideo.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..cache.mixin import Deferred, TeaCacheMixin
from ..checks import (
    batch_vector,
    check_attention_kwargs,
    check_dtype,
    check_tokens,
    check_video_latents,
)
from ..distributed.sequence import SequenceParallelMixin
from ..layers.embeddings import MLPEmbedder, timestep_sinusoids
from ..layers.normalization import AdaLayerNormContinuous
from ..lora import lora_scale_from
from .base import ConfiguredModel, Transformer2DModelOutput, register_config
from .hunyuan_video_blocks import (
    BlockInputs,
    HunyuanVideoPatchEmbed,
    HunyuanVideoRotaryPosEmbed,
    HunyuanVideoTokenRefiner,
    HunyuanVideoTransformerBlock,
    Rope,
    check_block_arguments,
    joint_attention_mask,
    unpatchify,
)

__all__ = ["HunyuanVideo15Transformer3DModel"]

_TIMESTEP_FEATURES = 256
_EPS = 1e-6
# The hidden width of the glyph-text projection in the released checkpoints (not a config field).
_BYT5_HIDDEN = 2048
_QK_NORMS = ("layer_norm", "fp32_layer_norm", "rms_norm")
_TASK_TYPES = ("t2v", "i2v")
# Rows of `cond_type_embed`: which stream a token of the joined "text" stream comes from.
_TEXT, _GLYPH, _IMAGE = 0, 1, 2


class HunyuanVideo15TimeEmbedding(nn.Module):
    """Timestep -> conditioning (B, D); the MeanFlow (step-distilled) variant adds the embedding of the
    next timestep `timestep_r`."""

    def __init__(self, embedding_dim: int, use_meanflow: bool = False) -> None:
        super().__init__()
        self.timestep_embedder = MLPEmbedder(_TIMESTEP_FEATURES, embedding_dim)
        self.timestep_embedder_r = MLPEmbedder(_TIMESTEP_FEATURES, embedding_dim) if use_meanflow else None

    @staticmethod
    def _embed(embedder: MLPEmbedder, t: torch.Tensor) -> torch.Tensor:
        return embedder(timestep_sinusoids(t, _TIMESTEP_FEATURES).to(embedder.linear_1.weight.dtype))

    def forward(self, timestep: torch.Tensor, timestep_r: torch.Tensor | None = None) -> torch.Tensor:
        """Timesteps (B,) or (1,) in [0, 1000] -> (B, D)."""
        temb = self._embed(self.timestep_embedder, timestep)
        if timestep_r is not None:
            temb = temb + self._embed(self.timestep_embedder_r, timestep_r)
        return temb


class HunyuanVideo15ByT5TextProjection(nn.Module):
    """Glyph-text states (B, L2, text_embed_2_dim) -> (B, L2, D): LayerNorm, then a 3-layer GELU MLP."""

    def __init__(self, in_features: int, hidden_size: int, out_features: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)
        self.linear_3 = nn.Linear(hidden_size, out_features)
        self.act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_fn(self.linear_1(self.norm(x)))
        return self.linear_3(self.act_fn(self.linear_2(x)))


class HunyuanVideo15ImageProjection(nn.Module):
    """SigLIP image tokens (B, Lv, image_embed_dim) -> (B, Lv, D), LayerNorm on both ends."""

    def __init__(self, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(in_channels)
        self.linear_1 = nn.Linear(in_channels, in_channels)
        self.act_fn = nn.GELU()
        self.linear_2 = nn.Linear(in_channels, hidden_size)
        self.norm_out = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_out(self.linear_2(self.act_fn(self.linear_1(self.norm_in(x)))))


def join_condition_streams(streams: list[tuple[torch.Tensor, torch.Tensor, bool]]) -> torch.Tensor:
    """Join (tokens (B, Li, D), boolean mask (B, Li), zero the padding?) streams into one (B, sum Li, D).

    Per sample the valid tokens of every stream come first, in stream order, then the padding in the same
    order, so that a sample's valid tokens are a prefix of the joined stream.
    """
    tokens = torch.cat([torch.where(mask[..., None], x, 0.0) if zero else x for x, mask, zero in streams], dim=1)
    padding = ~torch.cat([mask for _, mask, _ in streams], dim=1)  # (B, L)
    # A stable sort on "is padding" keeps each group in its original order.
    order = torch.argsort(padding.to(torch.int8), dim=1, stable=True)  # (B, L)
    return tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[-1]))


class HunyuanVideo15Transformer3DModel(ConfiguredModel, TeaCacheMixin, SequenceParallelMixin):
    """The HunyuanVideo-1.5 transformer (diffusers layout and keyword arguments) with TeaCache.

    Args:
        in_channels: latent channels in (65: 32 noisy, 32 of the conditioning frame, 1 mask).
        out_channels: predicted channels (default `in_channels`).
        num_attention_heads, attention_head_dim: heads and channels per head.
        num_layers: dual-stream blocks.
        num_refiner_layers: blocks of the text token refiner.
        mlp_ratio: MLP width of the blocks as a multiple of the model width.
        patch_size, patch_size_t: spatial and temporal patch sizes.
        qk_norm: "layer_norm", "fp32_layer_norm" or "rms_norm" on queries and keys per head.
        text_embed_dim: width of the Qwen2.5-VL states; text_embed_2_dim: of the ByT5 glyph states.
        image_embed_dim: width of the SigLIP image tokens.
        rope_theta: the RoPE base; rope_axes_dim: RoPE channels of the frame, row and column axes.
        target_size: the pixel size the pipeline's default resolution buckets aim at (480 or 720p).
        task_type: "t2v" or "i2v" (recorded for the pipelines; the computation is the same).
        use_meanflow: the step-distilled variant, which also embeds the next timestep `timestep_r`.
    """

    _skip_layerwise_casting_patterns: ClassVar[list[str]] = ["x_embedder", "context_embedder", "norm"]
    _no_split_modules: ClassVar[list[str]] = [
        "HunyuanVideo15TransformerBlock",
        "HunyuanVideo15PatchEmbed",
        "HunyuanVideo15TokenRefiner",
    ]
    _repeated_blocks: ClassVar[list[str]] = [
        "HunyuanVideo15TransformerBlock",
        "HunyuanVideo15PatchEmbed",
        "HunyuanVideo15TokenRefiner",
    ]

    # Per-sample TeaCache gathers these by batch row; the rotary tables are shared.
    teacache_row_inputs = frozenset({"encoder_hidden_states", "temb", "attention_mask"})
    # Sequence parallelism shards the image+text attention of every block (the text refiner's stays local).
    sequence_parallel_attention = ("transformer_blocks.*.attn",)

    @register_config
    def __init__(
        self,
        in_channels: int = 65,
        out_channels: int = 32,
        num_attention_heads: int = 16,
        attention_head_dim: int = 128,
        num_layers: int = 54,
        num_refiner_layers: int = 2,
        mlp_ratio: float = 4.0,
        patch_size: int = 1,
        patch_size_t: int = 1,
        qk_norm: str = "rms_norm",
        text_embed_dim: int = 3584,
        text_embed_2_dim: int = 1472,
        image_embed_dim: int = 1152,
        rope_theta: float = 256.0,
        rope_axes_dim: tuple[int, ...] = (16, 56, 56),
        target_size: int = 640,
        task_type: str = "i2v",
        use_meanflow: bool = False,
    ) -> None:
        super().__init__()
        check_block_arguments(locals(), qk_norms=_QK_NORMS)
        if task_type not in _TASK_TYPES:
            raise ValueError(f"task_type must be one of {list(_TASK_TYPES)}, got {task_type!r}")
        self.out_channels = out_channels or in_channels
        inner_dim = num_attention_heads * attention_head_dim
        heads = (num_attention_heads, attention_head_dim)

        # Created in diffusers' order, so that a seeded construction draws the same weights.
        self.x_embedder = HunyuanVideoPatchEmbed((patch_size_t, patch_size, patch_size), in_channels, inner_dim)
        self.image_embedder = HunyuanVideo15ImageProjection(image_embed_dim, inner_dim)
        self.context_embedder = HunyuanVideoTokenRefiner(
            text_embed_dim, *heads, num_layers=num_refiner_layers, attend_first_token=False
        )
        self.context_embedder_2 = HunyuanVideo15ByT5TextProjection(text_embed_2_dim, _BYT5_HIDDEN, inner_dim)
        self.time_embed = HunyuanVideo15TimeEmbedding(inner_dim, use_meanflow)
        self.cond_type_embed = nn.Embedding(3, inner_dim)
        self.rope = HunyuanVideoRotaryPosEmbed(tuple(rope_axes_dim), rope_theta)
        self.transformer_blocks = nn.ModuleList(
            [HunyuanVideoTransformerBlock(*heads, mlp_ratio, qk_norm) for _ in range(num_layers)]
        )
        self.norm_out = AdaLayerNormContinuous(inner_dim, inner_dim, elementwise_affine=False, eps=_EPS)
        self.proj_out = nn.Linear(inner_dim, patch_size_t * patch_size * patch_size * self.out_channels)

    @lora_scale_from("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        timestep_r: torch.Tensor | None = None,
        encoder_hidden_states_2: torch.Tensor | None = None,
        encoder_attention_mask_2: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict the flow for a latent video.

        Args:
            hidden_states: (B, in_channels, F, H, W) latents; F, H, W divisible by the patch sizes.
            timestep: (B,) timesteps in [0, 1000] (or one value for the whole batch).
            encoder_hidden_states: (B, Lt, text_embed_dim) Qwen2.5-VL states.
            encoder_attention_mask: (B, Lt) 0/1 or boolean mask of its valid tokens; an all-0 row gives no
                text tokens (the reference zeroes them, as it does any padding).
            timestep_r: (B,) the next timestep; only for `use_meanflow` models (None: not embedded).
            encoder_hidden_states_2: (B, L2, text_embed_2_dim) ByT5 glyph-text states (required).
            encoder_attention_mask_2: (B, L2) their mask; a row may be all 0 (a prompt without quoted text).
            image_embeds: (B, Lv, image_embed_dim) SigLIP tokens of the conditioning image (required);
                all zeros (in the whole batch) means text-to-video: the image tokens are then masked out.
            attention_kwargs: None, or only a LoRA `scale`, which multiplies the adapters' weights for this call.
            return_dict: return a `Transformer2DModelOutput` instead of a tuple.

        Returns:
            (B, out_channels, F, H, W) prediction, in a tuple or output object.
        """
        masks = self._check_inputs(
            hidden_states,
            encoder_hidden_states,
            encoder_attention_mask,
            timestep_r,
            encoder_hidden_states_2,
            encoder_attention_mask_2,
            image_embeds,
            attention_kwargs,
        )
        batch, _, frames, height, width = hidden_states.shape
        patch = (self.config.patch_size_t, self.config.patch_size, self.config.patch_size)
        grid = (frames // patch[0], height // patch[1], width // patch[2])
        device = hidden_states.device
        timestep = batch_vector("timestep", timestep, batch, device)
        if timestep_r is not None:
            timestep_r = batch_vector("timestep_r", timestep_r, batch, device)

        temb = self.time_embed(timestep, timestep_r)  # (B, D)
        latents = hidden_states
        hidden_states = self.x_embedder(hidden_states)  # (B, Li, D)
        image_len = hidden_states.shape[1]
        sp = self.sequence_parallel
        if sp is not None:
            # This rank keeps its shard of the image tokens; the joined text stream is on every rank.
            sp.begin(image_len)
            hidden_states = sp.shard(hidden_states)  # (B, Li / N, D)
            image_len = sp.padded_length
        text_inputs = (encoder_hidden_states, encoder_hidden_states_2, image_embeds)
        text_masks = (masks["text"], masks["glyph"], masks["image"])
        joined_mask = torch.cat(text_masks, dim=1)  # (B, Lt + L2 + Lv)
        attention_mask = joint_attention_mask(joined_mask, image_len)  # (B, 1, 1, Li + Lt + L2 + Lv)

        def rope() -> Rope:
            cos, sin = self.rope(grid, device)
            return (cos, sin) if sp is None else (sp.shard(cos, dim=0), sp.shard(sin, dim=0))

        # Only the blocks read the joined stream and the rotary tables: a skipped step computes neither.
        hidden_states = self.run_blocks(
            hidden_states,
            encoder_hidden_states=Deferred(
                lambda: self._condition_stream(timestep, text_inputs, text_masks), (*text_inputs, *text_masks)
            ),  # (B, Lt + L2 + Lv, D)
            temb=temb,
            attention_mask=attention_mask,
            rope=Deferred(rope, (tuple(latents.shape[1:]),)),  # per sample: a batch of any size shares it
        )  # (B, Li, D)

        output = self.proj_out(self.norm_out(hidden_states, temb))  # (B, Li, p_t * p * p * C)
        if sp is not None:
            output = sp.gather(output)
        output = unpatchify(output, grid, patch)  # (B, C, F, H, W)
        return (output,) if not return_dict else Transformer2DModelOutput(sample=output)

    def _condition_stream(
        self, timestep: torch.Tensor, inputs: tuple[torch.Tensor, ...], masks: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """Refined text, glyph text and image tokens, typed and joined valid-first -> (B, Lt + L2 + Lv, D)."""
        text, glyph, image = inputs
        text_mask, glyph_mask, image_mask = masks
        text = self.context_embedder(text, timestep, text_mask)  # (B, Lt, D)
        glyph = self.context_embedder_2(glyph)  # (B, L2, D)
        image = self.image_embedder(image)  # (B, Lv, D)
        # Text-to-video: the image tokens carry only their type embedding (and are masked out). Chosen on the
        # device, without reading the flag back: no sync, and no graph break under torch.compile.
        image = torch.where(image_mask.any(), image, image * 0.0)
        typed = [x + self.cond_type_embed.weight[kind] for x, kind in ((text, _TEXT), (glyph, _GLYPH), (image, _IMAGE))]
        # Image padding (text-to-video) keeps its values; glyph and text padding are zeroed, as in the reference.
        return join_condition_streams(
            [(typed[2], image_mask, False), (typed[1], glyph_mask, True), (typed[0], text_mask, True)]
        )

    # ---- TeaCache seam ----------------------------------------------------------------------------

    def teacache_indicator(self, hidden_states: torch.Tensor, temb: torch.Tensor, **_: Any) -> torch.Tensor:
        """Block 0's AdaLN-modulated image tokens (B, Li, D) (under sequence parallelism the mixin keeps this
        rank's real tokens)."""
        if len(self.transformer_blocks):
            return self.transformer_blocks[0].norm1(hidden_states, temb)[0]
        return hidden_states

    def forward_blocks(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        attention_mask: torch.Tensor,
        rope: Rope,
    ) -> torch.Tensor:
        """Dual-stream blocks: image (B, Li, D) and joined stream (B, Lc, D) -> image (B, Li, D)."""
        inputs = BlockInputs(temb, attention_mask, rope)
        for block in self.transformer_blocks:
            hidden_states, encoder_hidden_states = self.call_block(block, hidden_states, encoder_hidden_states, inputs)
        return hidden_states

    # ---- input validation -------------------------------------------------------------------------

    def _check_inputs(
        self,
        hidden_states: Any,
        text: Any,
        text_mask: Any,
        timestep_r: Any,
        glyph: Any,
        glyph_mask: Any,
        image: Any,
        attention_kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Validate the tensors; return the boolean masks of the text, glyph and image streams."""
        config = self.config
        patches = (config.patch_size_t, config.patch_size, config.patch_size)
        dtype = self.x_embedder.proj.weight.dtype
        batch, _ = check_video_latents("hidden_states", hidden_states, config.in_channels, dtype, patches)
        if timestep_r is not None and not config.use_meanflow:
            raise ValueError("timestep_r is only read by a use_meanflow=True model; pass None")

        streams = {
            "encoder_hidden_states": (text, config.text_embed_dim, self.context_embedder.proj_in.weight),
            "encoder_hidden_states_2": (glyph, config.text_embed_2_dim, self.context_embedder_2.linear_1.weight),
            "image_embeds": (image, config.image_embed_dim, self.image_embedder.linear_1.weight),
        }
        for name, (value, width, weight) in streams.items():
            if value is None:
                raise ValueError(
                    f"{name} is required (the reference pipelines always pass it: ByT5 states with an all-0 "
                    "mask for a prompt without quoted text, zero image_embeds for text-to-video)"
                )
            check_tokens(name, value, batch, width, min_length=1)
            check_dtype(name, value, weight.dtype)
        check_attention_kwargs("attention_kwargs", attention_kwargs)
        # All zeros in the whole batch means text-to-video, as in the reference (a (1, 1) flag, not read back).
        image_valid = (image != 0).any().reshape(1, 1)
        return {
            "text": _check_mask("encoder_attention_mask", text_mask, text),
            "glyph": _check_mask("encoder_attention_mask_2", glyph_mask, glyph),
            "image": image_valid.expand(image.shape[:2]),
        }


def _check_mask(name: str, mask: Any, tokens: torch.Tensor) -> torch.Tensor:
    """A 0/1 or boolean (B, L) mask of `tokens`; a row may be all 0 (the reference then zeroes the stream)."""
    shape = tuple(tokens.shape[:2])
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape {shape}, got {type(mask).__name__}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (batch, tokens of its states), got {tuple(mask.shape)}")
    if torch.compiler.is_compiling():
        return mask.bool()  # reading values would break the graph at every call; eager calls check them
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1 (or be boolean)")
    return mask.bool()
