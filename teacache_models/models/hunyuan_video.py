"""HunyuanVideo (T2V, and the I2V variants): the native transformer, with TeaCache on its block stack.

Architecture, parameter names and numerics follow diffusers' `HunyuanVideoTransformer3DModel`: the
latent video is cut into 3-D patches, the text states pass a small token refiner conditioned on the
timestep and their masked mean, then `num_layers` dual-stream blocks and `num_single_layers`
single-stream blocks run over image tokens followed by text tokens, and the image part goes through the
final AdaLN and projection before unpatchifying. RoPE (3 axes, theta 256, real fp32) rotates image
tokens only. TeaCache skips both block stacks; its indicator is block 0's modulated image input.

I2V: `image_condition_type="latent_concat"` changes nothing inside the transformer (the pipeline
concatenates the image latents on the channel axis, hence `in_channels=33`); `"token_replace"` gives
the first latent frame's tokens their own modulation, computed from timestep 0.
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
    check_tensor,
    check_tokens,
    check_video_latents,
)
from ..distributed.sequence import SequenceParallelMixin
from ..layers.normalization import AdaLayerNormContinuous
from ..lora import lora_scale_from
from .base import ConfiguredModel, Transformer2DModelOutput, register_config
from .hunyuan_video_blocks import (
    BlockInputs,
    HunyuanVideoConditionEmbedding,
    HunyuanVideoPatchEmbed,
    HunyuanVideoRotaryPosEmbed,
    HunyuanVideoSingleTransformerBlock,
    HunyuanVideoTokenRefiner,
    HunyuanVideoTransformerBlock,
    Rope,
    TokenReplace,
    check_block_arguments,
    check_text_mask,
    joint_attention_mask,
    unpatchify,
)

__all__ = ["HunyuanVideoTransformer3DModel"]

_EPS = 1e-6
_IMAGE_CONDITION_TYPES = (None, "latent_concat", "token_replace")


class HunyuanVideoTransformer3DModel(ConfiguredModel, TeaCacheMixin, SequenceParallelMixin):
    """The HunyuanVideo transformer (diffusers layout and keyword arguments) with TeaCache.

    Args:
        in_channels: latent channels (33 for the latent-concat I2V model).
        out_channels: predicted channels (default `in_channels`).
        num_attention_heads, attention_head_dim: heads and channels per head.
        num_layers: dual-stream blocks.
        num_single_layers: single-stream blocks.
        num_refiner_layers: blocks of the text token refiner.
        mlp_ratio: MLP width of the transformer blocks as a multiple of the model width (the refiner's
            is always 4, as in the released checkpoints).
        patch_size, patch_size_t: spatial and temporal patch sizes.
        qk_norm: None, "layer_norm", "fp32_layer_norm" or "rms_norm" on queries and keys per head.
        guidance_embeds: the model embeds a guidance scale (the guidance-distilled release).
        text_embed_dim: width of the text encoder states.
        pooled_projection_dim: width of the pooled text embedding.
        rope_theta: the RoPE base.
        rope_axes_dim: RoPE channels of the frame, row and column axes; must sum to `attention_head_dim`.
        image_condition_type: None (T2V), "latent_concat" or "token_replace" (I2V).
    """

    _skip_layerwise_casting_patterns: ClassVar[list[str]] = ["x_embedder", "context_embedder", "norm"]
    _no_split_modules: ClassVar[list[str]] = [
        "HunyuanVideoTransformerBlock",
        "HunyuanVideoSingleTransformerBlock",
        "HunyuanVideoTokenReplaceTransformerBlock",
        "HunyuanVideoTokenReplaceSingleTransformerBlock",
        "HunyuanVideoPatchEmbed",
        "HunyuanVideoTokenRefiner",
    ]
    _repeated_blocks: ClassVar[list[str]] = [
        "HunyuanVideoTransformerBlock",
        "HunyuanVideoSingleTransformerBlock",
        "HunyuanVideoPatchEmbed",
        "HunyuanVideoTokenRefiner",
    ]

    # Per-sample TeaCache gathers these by batch row; the rotary tables are shared.
    teacache_row_inputs = frozenset({"encoder_hidden_states", "temb", "attention_mask", "token_replace"})
    # Sequence parallelism shards the image+text attention of every block (the text refiner's stays local).
    sequence_parallel_attention = ("transformer_blocks.*.attn", "single_transformer_blocks.*.attn")

    @register_config
    def __init__(
        self,
        in_channels: int = 16,
        out_channels: int = 16,
        num_attention_heads: int = 24,
        attention_head_dim: int = 128,
        num_layers: int = 20,
        num_single_layers: int = 40,
        num_refiner_layers: int = 2,
        mlp_ratio: float = 4.0,
        patch_size: int = 2,
        patch_size_t: int = 1,
        qk_norm: str = "rms_norm",
        guidance_embeds: bool = True,
        text_embed_dim: int = 4096,
        pooled_projection_dim: int = 768,
        rope_theta: float = 256.0,
        rope_axes_dim: tuple[int, ...] = (16, 56, 56),
        image_condition_type: str | None = None,
    ) -> None:
        super().__init__()
        check_block_arguments(locals())
        if image_condition_type not in _IMAGE_CONDITION_TYPES:
            raise ValueError(
                f"image_condition_type must be one of {list(_IMAGE_CONDITION_TYPES)}, got {image_condition_type!r}"
            )
        self.out_channels = out_channels or in_channels
        inner_dim = num_attention_heads * attention_head_dim
        heads = (num_attention_heads, attention_head_dim)

        self.x_embedder = HunyuanVideoPatchEmbed((patch_size_t, patch_size, patch_size), in_channels, inner_dim)
        self.context_embedder = HunyuanVideoTokenRefiner(text_embed_dim, *heads, num_layers=num_refiner_layers)
        self.time_text_embed = HunyuanVideoConditionEmbedding(inner_dim, pooled_projection_dim, guidance_embeds)
        self.rope = HunyuanVideoRotaryPosEmbed(tuple(rope_axes_dim), rope_theta)
        self.transformer_blocks = nn.ModuleList(
            [HunyuanVideoTransformerBlock(*heads, mlp_ratio, qk_norm) for _ in range(num_layers)]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [HunyuanVideoSingleTransformerBlock(*heads, mlp_ratio, qk_norm) for _ in range(num_single_layers)]
        )
        self.norm_out = AdaLayerNormContinuous(inner_dim, inner_dim, elementwise_affine=False, eps=_EPS)
        self.proj_out = nn.Linear(inner_dim, patch_size_t * patch_size * patch_size * self.out_channels)

    @lora_scale_from("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        pooled_projections: torch.Tensor,
        guidance: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict the flow for a latent video.

        Args:
            hidden_states: (B, in_channels, F, H, W) latents; F, H, W divisible by the patch sizes.
            timestep: (B,) timesteps in [0, 1000] (or one value for the whole batch).
            encoder_hidden_states: (B, Lt, text_embed_dim) text encoder states, or (1, ...) with a (1, Lt) mask: one
                text for the whole batch (broadcast, as diffusers' true CFG passes its negative prompt).
            encoder_attention_mask: (B, Lt) 0/1 or boolean mask of the valid text tokens (tokenizers pad on
                the right); None means every token is valid. As in the reference, the refiner reads the mask
                itself and the blocks attend the first `mask.sum()` text tokens of each row.
            pooled_projections: (B, pooled_projection_dim) pooled text embedding.
            guidance: (B,) embedded guidance scale times 1000; required when `guidance_embeds`, ignored
                otherwise (the reference pipeline always passes it).
            attention_kwargs: None, or only a LoRA `scale`, which multiplies the adapters' weights for this call.
            return_dict: return a `Transformer2DModelOutput` instead of a tuple.

        Returns:
            (B, out_channels, F, H, W) prediction, in a tuple or output object.
        """
        text_mask = self._check_inputs(
            hidden_states, encoder_hidden_states, encoder_attention_mask, pooled_projections, attention_kwargs
        )
        batch, _, frames, height, width = hidden_states.shape
        p, p_t = self.config.patch_size, self.config.patch_size_t
        grid = (frames // p_t, height // p, width // p)
        device = hidden_states.device
        timestep = batch_vector("timestep", timestep, batch, device)
        if self.config.guidance_embeds:
            if guidance is None:
                raise ValueError("guidance is required: this model has guidance_embeds=True (the distilled release)")
            guidance = batch_vector("guidance", guidance, batch, device)
        else:
            guidance = None

        token_replace = self.config.image_condition_type == "token_replace"
        temb, replace_emb = self.time_text_embed(timestep, pooled_projections, guidance, token_replace)  # (B, D)
        latents, text = hidden_states, encoder_hidden_states
        hidden_states = self.x_embedder(hidden_states)  # (B, Li, D)
        image_len, first_frame_tokens = hidden_states.shape[1], grid[1] * grid[2]
        sp = self.sequence_parallel
        if sp is not None:
            # This rank keeps its shard of the image tokens; the attention keys span every shard (the
            # padding included, which the attention masks out).
            sp.begin(image_len)
            hidden_states = sp.shard(hidden_states)  # (B, Li / N, D)
            image_len, first_frame_tokens = sp.padded_length, sp.local_count(first_frame_tokens)
        attention_mask = joint_attention_mask(text_mask, image_len)  # (B, 1, 1, Li + Lt)

        def rope() -> tuple[torch.Tensor, torch.Tensor]:
            cos, sin = self.rope(grid, device)
            return (cos, sin) if sp is None else (sp.shard(cos, dim=0), sp.shard(sin, dim=0))

        # Only the blocks read the refined text and the rotary tables: a skipped step computes neither.
        hidden_states = self.run_blocks(
            hidden_states,
            encoder_hidden_states=Deferred(
                lambda: self.context_embedder(text, timestep, text_mask), (text, timestep, text_mask)
            ),  # (B, Lt, D)
            temb=temb,
            attention_mask=attention_mask,
            rope=Deferred(rope, (tuple(latents.shape[1:]),)),  # per sample: a batch of any size shares it
            token_replace=None if replace_emb is None else (replace_emb, first_frame_tokens),
        )  # (B, Li, D)

        output = self.proj_out(self.norm_out(hidden_states, temb))  # (B, Li, p_t * p * p * C)
        if sp is not None:
            output = sp.gather(output)  # every rank's shard: (B, Li, p_t * p * p * C)
        output = unpatchify(output, grid, (p_t, p, p))  # (B, C, F, H, W)
        return (output,) if not return_dict else Transformer2DModelOutput(sample=output)

    # ---- TeaCache seam ----------------------------------------------------------------------------

    def teacache_indicator(
        self, hidden_states: torch.Tensor, temb: torch.Tensor, token_replace: TokenReplace | None = None, **_: Any
    ) -> torch.Tensor:
        """Block 0's AdaLN-modulated image tokens (B, Li, D) (under sequence parallelism the mixin keeps this
        rank's real tokens)."""
        if len(self.transformer_blocks):
            return self.transformer_blocks[0].norm1(hidden_states, temb, token_replace)[0]
        if len(self.single_transformer_blocks):
            return self.single_transformer_blocks[0].norm(hidden_states, temb, token_replace)[0]
        return hidden_states

    def forward_blocks(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        attention_mask: torch.Tensor,
        rope: Rope,
        token_replace: TokenReplace | None = None,
    ) -> torch.Tensor:
        """Dual-stream then single-stream blocks: image (B, Li, D) -> image (B, Li, D)."""
        inputs = BlockInputs(temb, attention_mask, rope, token_replace)
        for block in self.transformer_blocks:
            hidden_states, encoder_hidden_states = self.call_block(block, hidden_states, encoder_hidden_states, inputs)
        image_len = hidden_states.shape[1]
        # The single-stream blocks keep image and text joined; splitting after each block would only copy.
        tokens = torch.cat([hidden_states, encoder_hidden_states], dim=1)  # (B, Li + Lt, D)
        for block in self.single_transformer_blocks:
            tokens = self.call_block(block, tokens, image_len, inputs)
        return tokens[:, :image_len]

    # ---- input validation -------------------------------------------------------------------------

    def _check_inputs(
        self,
        hidden_states: Any,
        encoder_hidden_states: Any,
        encoder_attention_mask: Any,
        pooled_projections: Any,
        attention_kwargs: dict[str, Any] | None,
    ) -> torch.Tensor:
        """Validate the tensors; return the text mask (B, Lt), all ones when None was passed."""
        config = self.config
        patches = (config.patch_size_t, config.patch_size, config.patch_size)
        dtype = self.x_embedder.proj.weight.dtype
        batch, _ = check_video_latents("hidden_states", hidden_states, config.in_channels, dtype, patches)

        # One sample's text may stand for the whole batch, as in diffusers (its true CFG's negative prompt).
        check_tokens("encoder_hidden_states", encoder_hidden_states, batch, config.text_embed_dim, broadcast=True)
        if encoder_hidden_states.shape[1] == 0:
            raise ValueError("encoder_hidden_states must hold at least one text token, got 0")
        check_dtype("encoder_hidden_states", encoder_hidden_states, self.context_embedder.proj_in.weight.dtype)
        text_mask = check_text_mask(encoder_attention_mask, encoder_hidden_states)

        check_tensor("pooled_projections", pooled_projections, ((1, batch), config.pooled_projection_dim))
        check_dtype("pooled_projections", pooled_projections, self.time_text_embed.text_embedder.linear_1.weight.dtype)
        check_attention_kwargs("attention_kwargs", attention_kwargs)
        return text_mask
