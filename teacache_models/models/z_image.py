"""Z-Image (Turbo): the native transformer, with TeaCache on its main layer stack.

Architecture, parameter names and numerics follow diffusers' `ZImageTransformer2DModel`. Every sample
of a batch is a list entry of its own size: image latents are patchified into tokens, captions are
embedded, and both are padded to a multiple of 32 tokens with learned pad tokens. A timestep-modulated
noise refiner runs over the image tokens and an unmodulated context refiner over the caption tokens;
then one stream per sample (image tokens first, caption tokens after) passes the main `layers`, and the
image part goes through the final layer and is unpatchified back to (C, F, H, W). How the per-sample
lists are checked and laid out as padded token sequences is in `z_image_inputs`.

The refiners are the cached stack's prelude (`teacache_prelude`): image tokens in, the joint stream out.
TeaCache's default indicator (`modulated_input`, the published one) is the first main layer's
`attention_norm1` output scaled by (1 + scale_msa): it is read after the prelude, so a skipped step
still runs the refiners and skips only the main `layers`. The `refiner_modulated_input` indicator reads
the same quantity at the first noise-refiner block, before the prelude, so a skipped step skips the
refiners too (it has no published coefficients: fit them with `scripts/calibrate.py`).

The Omni mode (x a list of lists of latents, with `siglip_feats` and `image_noise_mask`) follows diffusers too:
per sample, captions, then condition latents and the target, then SigLIP tokens form the stream, and the
tokens of clean condition images are modulated with the timestep t = 1 instead of t. There the TeaCache
indicator is read with that per-token modulation; `refiner_modulated_input` is not supported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from numbers import Real
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from ..cache import TeaCacheIndicator, TeaCacheMixin
from ..checks import check_attention_kwargs, check_rope_axes, is_int
from ..layers import RMSNorm, apply_rotary_complex, attention, linear_activation, timestep_sinusoids
from ..lora import lora_scale_from
from .base import ConfiguredModel, Transformer2DModelOutput, register_config
from .z_image_inputs import (
    SEQ_MULTIPLE,
    Inputs,
    Segment,
    Sequences,
    check_inputs,
    joint_layout,
    omni_layout,
    pad_batch,
    stream_noise_mask,
    text_to_image_layout,
    unify,
    unpatchify,
)

__all__ = ["ZImageTransformer2DModel"]

# The timestep conditioning is at most 256 wide, whatever the model width.
_ADALN_EMBED_DIM = 256
_TIMESTEP_FEATURES = 256
_TIMESTEP_HIDDEN = 1024
# The TeaCache indicator read before the refiners: a skipped step then skips them too.
_REFINER_INDICATOR = "refiner_modulated_input"


class ZImageRopeEmbedder:
    """Complex RoPE factors per position-id axis, looked up in tables of `axes_lens` rows.

    The tables are built on the CPU from float64 angles (as the released model was) and copied once per
    device; they hold no weights, so they are no part of the state dict.
    """

    def __init__(self, theta: float, axes_dims: tuple[int, ...], axes_lens: tuple[int, ...]) -> None:
        self.theta = theta
        self.axes_dims = axes_dims
        self.axes_lens = axes_lens
        self._tables: dict[torch.device, list[torch.Tensor]] = {}

    def _build_tables(self) -> list[torch.Tensor]:
        tables = []
        for dim, length in zip(self.axes_dims, self.axes_lens, strict=True):
            frequencies = 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
            angles = torch.outer(torch.arange(length, dtype=torch.float64), frequencies).float()
            tables.append(torch.polar(torch.ones_like(angles), angles).to(torch.complex64))  # (length, dim / 2)
        return tables

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """(L, 3) integer position ids -> (L, sum(axes_dims) / 2) complex64 factors."""
        cpu = torch.device("cpu")
        if cpu not in self._tables:
            self._tables[cpu] = self._build_tables()
        if ids.device not in self._tables:
            self._tables[ids.device] = [table.to(ids.device) for table in self._tables[cpu]]
        tables = self._tables[ids.device]
        # An axis of 0 channels adds nothing, whatever its positions.
        return torch.cat([table[ids[:, axis]] for axis, table in enumerate(tables) if table.shape[1]], dim=-1)


class ZImageTimestepEmbedder(nn.Module):
    """Sinusoidal timestep features (cosines first) -> Linear -> SiLU -> Linear."""

    def __init__(self, out_size: int, mid_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(_TIMESTEP_FEATURES, mid_size), nn.SiLU(), nn.Linear(mid_size, out_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(N,) scaled timesteps -> (N, out_size) in the weights' dtype."""
        features = timestep_sinusoids(t, _TIMESTEP_FEATURES)
        weight_dtype = self.mlp[0].weight.dtype
        if weight_dtype.is_floating_point:
            features = features.to(weight_dtype)
        return self.mlp(features)


class ZImageAttention(nn.Module):
    """Self-attention with per-head RMS-normalised queries and keys and complex RoPE; no biases."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        head_dim = dim // num_heads
        inner_dim = head_dim * num_heads
        self.heads = num_heads
        # Created in diffusers' order, so that the state_dict keys come in its order.
        self.norm_q = RMSNorm(head_dim, eps=1e-5) if qk_norm else None
        self.norm_k = RMSNorm(head_dim, eps=1e-5) if qk_norm else None
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_k = nn.Linear(dim, inner_dim, bias=False)
        self.to_v = nn.Linear(dim, inner_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, dim, bias=False)])

    def forward(
        self, hidden_states: torch.Tensor, attn_mask: torch.Tensor | None, freqs_cis: torch.Tensor
    ) -> torch.Tensor:
        """(B, L, D) tokens, (B, L) key mask or None, (B, L, Dh / 2) RoPE factors -> (B, L, D)."""
        q = self.to_q(hidden_states).unflatten(-1, (self.heads, -1))  # (B, L, H, Dh)
        k = self.to_k(hidden_states).unflatten(-1, (self.heads, -1))
        v = self.to_v(hidden_states).unflatten(-1, (self.heads, -1))
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k = apply_rotary_complex(q, freqs_cis), apply_rotary_complex(k, freqs_cis)
        # The qk norms may promote half-precision queries and keys to float32; values are not.
        k = k.to(q.dtype)
        mask = None if attn_mask is None else attn_mask[:, None, None, :]  # (B, 1, 1, L)
        return self.to_out[0](attention(q, k, v, attn_mask=mask))


class ZImageFeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(linear_activation(self.w1, x, "silu") * self.w3(x))


class _Conditioning(NamedTuple):
    """The timestep conditioning (B, C); in the Omni mode also that of the clean condition images (t = 1) and the
    joint stream's (B, L) noise mask, 1 at the noisy tokens."""

    noisy: torch.Tensor
    noise_mask: torch.Tensor | None = None
    clean: torch.Tensor | None = None

    def per_token(self, project: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """`project(conditioning)`, (B, 1, D) tensors; in the Omni mode chosen per token, (B, L, D) each: the noisy
        tokens take the projection of the conditioning, the others that of the clean conditioning."""
        values = project(self.noisy)
        if self.noise_mask is None:
            return values
        noisy = (self.noise_mask == 1).unsqueeze(-1)  # (B, L, 1)
        return tuple(torch.where(noisy, a, b) for a, b in zip(values, project(self.clean), strict=True))


class ZImageTransformerBlock(nn.Module):
    """Pre- and post-normalised attention and MLP; with `modulation`, scaled and tanh-gated by the timestep.

    The modulation has no shift: its projection is chunked as scale_msa, gate_msa, scale_mlp, gate_mlp.
    """

    def __init__(self, dim: int, n_heads: int, norm_eps: float, qk_norm: bool, modulation: bool = True) -> None:
        super().__init__()
        self.attention = ZImageAttention(dim, n_heads, qk_norm)
        # int(dim / 3 * 8): the released checkpoints' hidden width (10240 for dim 3840).
        self.feed_forward = ZImageFeedForward(dim, int(dim / 3 * 8))
        self.attention_norm1 = RMSNorm(dim, eps=norm_eps)
        self.ffn_norm1 = RMSNorm(dim, eps=norm_eps)
        self.attention_norm2 = RMSNorm(dim, eps=norm_eps)
        self.ffn_norm2 = RMSNorm(dim, eps=norm_eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.Linear(min(dim, _ADALN_EMBED_DIM), 4 * dim))

    def modulation_factors(
        self,
        adaln_input: torch.Tensor,
        noise_mask: torch.Tensor | None = None,
        adaln_clean: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C) conditioning -> (1 + scale_msa), tanh(gate_msa), (1 + scale_mlp), tanh(gate_mlp), (B, 1, D) each.

        With a (B, L) `noise_mask` (the Omni mode), tokens whose mask is 1 take the factors of `adaln_input` and
        the others those of `adaln_clean`: (B, L, D) each.
        """
        return _Conditioning(adaln_input, noise_mask, adaln_clean).per_token(self._factors)

    def _factors(self, adaln_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln_input).unsqueeze(1).chunk(4, dim=2)
        return 1.0 + scale_msa, gate_msa.tanh(), 1.0 + scale_mlp, gate_mlp.tanh()

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        freqs_cis: torch.Tensor,
        adaln_input: torch.Tensor | None = None,
        noise_mask: torch.Tensor | None = None,
        adaln_clean: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L, D) tokens -> (B, L, D); `adaln_input` (B, C) is required exactly when modulated, `adaln_clean`
        exactly with a (B, L) `noise_mask` (see `modulation_factors`)."""
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), attn_mask, freqs_cis))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.modulation_factors(adaln_input, noise_mask, adaln_clean)
        attn = self.attention(self.attention_norm1(x) * scale_msa, attn_mask, freqs_cis)
        x = x + gate_msa * self.attention_norm2(attn)
        return x + gate_mlp * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * scale_mlp))


class ZImageFinalLayer(nn.Module):
    """LayerNorm scaled by (1 + the conditioning's projection), then the projection to patch values."""

    def __init__(self, hidden_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(hidden_size, _ADALN_EMBED_DIM), hidden_size))

    def forward(self, x: torch.Tensor, conditioning: _Conditioning) -> torch.Tensor:
        """(B, L, D) tokens -> (B, L, out_channels); in the Omni mode the clean tokens are scaled by the clean
        conditioning."""
        (scale,) = conditioning.per_token(self._scale)  # (B, 1 or L, D)
        return self.linear(self.norm_final(x) * scale)

    def _scale(self, conditioning: torch.Tensor) -> tuple[torch.Tensor]:
        return ((1.0 + self.adaLN_modulation(conditioning)).unsqueeze(1),)


class ZImageTransformer2DModel(ConfiguredModel, TeaCacheMixin):
    """The Z-Image transformer (diffusers layout and keyword arguments) with TeaCache.

    Args:
        all_patch_size: spatial patch sizes with an embedder and a final layer each.
        all_f_patch_size: the temporal patch size paired with each spatial one.
        in_channels: latent channels (also the predicted channels).
        dim: model width.
        n_layers: main layers over the joint image + caption stream.
        n_refiner_layers: layers of the noise (image) refiner and of the context (caption) refiner each.
        n_heads: attention heads; channels per head are `dim // n_heads` and must equal `sum(axes_dims)`.
        n_kv_heads: recorded for checkpoint configs; keys and values have `n_heads` heads.
        norm_eps: epsilon of the block RMSNorms.
        qk_norm: RMS-normalise queries and keys per head.
        cap_feat_dim: width of the caption (text encoder) features.
        siglip_feat_dim: width of the Omni variant's SigLIP features (None: no SigLIP stream).
        rope_theta: RoPE base.
        t_scale: factor applied to `t` before the sinusoidal embedding.
        axes_dims: RoPE channels per position axis (time, height, width).
        axes_lens: number of positions per axis the RoPE tables cover.
    """

    _no_split_modules: ClassVar[list[str]] = ["ZImageTransformerBlock"]
    _repeated_blocks: ClassVar[list[str]] = ["ZImageTransformerBlock"]
    _skip_layerwise_casting_patterns: ClassVar[list[str]] = ["t_embedder", "cap_embedder"]
    # t_scale may be any real number (see `_check_architecture`).
    _arguments_checked_by_model: ClassVar[tuple[str, ...]] = ("t_scale",)
    teacache_indicators = (
        TeaCacheIndicator("modulated_input"),
        TeaCacheIndicator(_REFINER_INDICATOR, before_prelude=True),
    )

    @register_config
    def __init__(
        self,
        all_patch_size: tuple[int, ...] = (2,),
        all_f_patch_size: tuple[int, ...] = (1,),
        in_channels: int = 16,
        dim: int = 3840,
        n_layers: int = 30,
        n_refiner_layers: int = 2,
        n_heads: int = 30,
        n_kv_heads: int = 30,
        norm_eps: float = 1e-5,
        qk_norm: bool = True,
        cap_feat_dim: int = 2560,
        siglip_feat_dim: int | None = None,
        rope_theta: float = 256.0,
        t_scale: float = 1000.0,
        # Lists, as diffusers' defaults (never mutated): the recorded config then equals its own.
        axes_dims: Sequence[int] = [32, 48, 48],
        axes_lens: Sequence[int] = [1024, 512, 512],
    ) -> None:
        super().__init__()
        _check_architecture(locals())
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.dim = dim

        self.all_x_embedder = nn.ModuleDict()
        self.all_final_layer = nn.ModuleDict()
        for p, pf in zip(all_patch_size, all_f_patch_size, strict=True):
            self.all_x_embedder[f"{p}-{pf}"] = nn.Linear(pf * p * p * in_channels, dim)
            self.all_final_layer[f"{p}-{pf}"] = ZImageFinalLayer(dim, p * p * pf * self.out_channels)

        def blocks(count: int, modulation: bool) -> nn.ModuleList:
            return nn.ModuleList(
                [ZImageTransformerBlock(dim, n_heads, norm_eps, qk_norm, modulation) for _ in range(count)]
            )

        self.noise_refiner = blocks(n_refiner_layers, modulation=True)
        self.context_refiner = blocks(n_refiner_layers, modulation=False)
        self.t_embedder = ZImageTimestepEmbedder(min(dim, _ADALN_EMBED_DIM), mid_size=_TIMESTEP_HIDDEN)
        self.cap_embedder = nn.Sequential(RMSNorm(cap_feat_dim, eps=norm_eps), nn.Linear(cap_feat_dim, dim))
        if siglip_feat_dim is not None:
            self.siglip_embedder = nn.Sequential(
                RMSNorm(siglip_feat_dim, eps=norm_eps), nn.Linear(siglip_feat_dim, dim)
            )
            self.siglip_refiner = blocks(n_refiner_layers, modulation=False)
            self.siglip_pad_token = nn.Parameter(torch.zeros((1, dim)))
        # Registered here, as in diffusers, so that the state_dict keys come in its order.
        self.x_pad_token = nn.Parameter(torch.zeros((1, dim)))
        self.cap_pad_token = nn.Parameter(torch.zeros((1, dim)))
        self.layers = blocks(n_layers, modulation=True)
        self.rope_embedder = ZImageRopeEmbedder(rope_theta, tuple(axes_dims), tuple(axes_lens))

    @lora_scale_from("joint_attention_kwargs")
    def forward(
        self,
        x: list[torch.Tensor],
        t: torch.Tensor,
        cap_feats: list[torch.Tensor],
        return_dict: bool = True,
        controlnet_block_samples: dict[int, torch.Tensor] | None = None,
        siglip_feats: list[list[torch.Tensor]] | None = None,
        image_noise_mask: list[list[int]] | None = None,
        patch_size: int = 2,
        f_patch_size: int = 1,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> Transformer2DModelOutput | tuple[list[torch.Tensor]]:
        """Predict the flow of each sample's latents.

        Args:
            x: B latents (in_channels, F, H, W); F, H, W divisible by the patch sizes. Sizes may differ. In the
                Omni mode, B lists of latents, the condition images first and the target last (None for a
                missing condition image).
            t: (B,) or (1,) timesteps, 1 - sigma in [0, 1] (scaled by `t_scale` inside).
            cap_feats: B caption features (L_i, cap_feat_dim); lengths may differ. In the Omni mode, B lists
                with a caption per image (and possibly more).
            return_dict: return a `Transformer2DModelOutput` instead of a tuple.
            controlnet_block_samples: {main layer index: (B, L, dim) residual added after that layer}.
            siglip_feats: Omni mode only: per sample None or a list of (H, W, siglip_feat_dim) features (or None)
                per image; the SigLIP stream runs when the first sample has features and the model has
                `siglip_feat_dim`.
            image_noise_mask: Omni mode only: per sample, a flag per image: 1 for the noisy target, 0 for clean
                conditions (their tokens are modulated with t = 1).
            patch_size, f_patch_size: a configured (spatial, temporal) patch size pair.
            joint_attention_kwargs: None, or only a LoRA `scale`, which multiplies the adapters' weights for this call.

        Returns:
            A list of B predictions (in_channels, F, H, W) (in the Omni mode, of each sample's last image), in a
            tuple or output object.
        """
        check_inputs(
            self.config,
            self.x_pad_token.dtype,
            x,
            t,
            cap_feats,
            controlnet_block_samples,
            siglip_feats,
            image_noise_mask,
            patch_size,
            f_patch_size,
        )
        check_attention_kwargs("joint_attention_kwargs", joint_attention_kwargs)
        if image_noise_mask is not None and self.teacache_indicator_name == _REFINER_INDICATOR:
            raise ValueError(
                f"TeaCache's indicator {_REFINER_INDICATOR!r} does not support the Omni mode (nested x); "
                "use indicator 'modulated_input'"
            )
        inputs = Inputs(x, t, cap_feats, siglip_feats, image_noise_mask)
        if not self.claim_batched_cfg_call():
            samples = self._predict(inputs, controlnet_block_samples, patch_size, f_patch_size)
        else:
            # A call batching both CFG branches: each half runs as its own branch, each with its own cache.
            samples = []
            for negative, half in _cfg_halves(inputs, controlnet_block_samples):
                with self.teacache_branch(negative):
                    samples += self._predict(half, None, patch_size, f_patch_size)
        return (samples,) if not return_dict else Transformer2DModelOutput(sample=samples)

    def _predict(
        self,
        inputs: Inputs,
        controlnet_block_samples: dict[int, torch.Tensor] | None,
        patch_size: int,
        f_patch_size: int,
    ) -> list[torch.Tensor]:
        """Embed -> refiners -> main layers (TeaCache) -> final layer -> unpatchify."""
        key = f"{patch_size}-{f_patch_size}"
        t = inputs.t
        omni = inputs.image_noise_mask is not None
        reference = inputs.x[0][-1] if omni else inputs.x[0]
        adaln_input = self.t_embedder(t * self.config.t_scale).type_as(reference)  # (B, C)
        # The Omni mode's clean condition images are modulated as at t = 1.
        adaln_clean = self.t_embedder(torch.ones_like(t) * self.config.t_scale).type_as(reference) if omni else None
        if omni:
            layout = omni_layout(inputs, patch_size, f_patch_size, self.in_channels, self.config.siglip_feat_dim)
        else:
            layout = text_to_image_layout(inputs, patch_size, f_patch_size)

        image_seq = self._embed("x", self.all_x_embedder[key], layout.images, self.x_pad_token, omni)
        cap_seq = self._embed("cap_feats", self.cap_embedder, layout.captions, self.cap_pad_token, omni)
        siglip_seq = None
        if layout.siglip is not None:
            siglip_seq = self._embed("siglip_feats", self.siglip_embedder, layout.siglip, self.siglip_pad_token, omni)
        # The refiners are the stack's prelude (`teacache_prelude`): image tokens in, the joint stream out.
        sequences = (image_seq, cap_seq, siglip_seq)
        hidden_states = self.run_blocks(
            image_seq.tokens,
            sequences=sequences,
            adaln_input=adaln_input,
            adaln_clean=adaln_clean,
            controlnet_block_samples=controlnet_block_samples,
        )  # (B, L, D)
        noise_mask = stream_noise_mask(_stream_parts(*sequences))
        conditioning = _Conditioning(adaln_input, noise_mask, adaln_clean)
        output = self.all_final_layer[key](hidden_states, conditioning)  # (B, L, pf p p C)
        # The image tokens follow the captions in the Omni layout and lead the stream otherwise.
        offsets = cap_seq.lengths if omni else [0] * len(cap_seq.lengths)
        return [
            self._last_image(sample[offset:], segments, grids, patch_size, f_patch_size)
            for sample, offset, segments, grids in zip(
                output.unbind(0), offsets, layout.images, layout.grids, strict=True
            )
        ]

    def _last_image(
        self,
        tokens: torch.Tensor,
        segments: list[Segment],
        grids: list[tuple[int, int, int] | None],
        patch_size: int,
        f_patch_size: int,
    ) -> torch.Tensor:
        """A sample's output tokens from its first image on -> the prediction of its last (present) image."""
        start, image = 0, None
        for segment, grid in zip(segments, grids, strict=True):
            if grid is not None:
                image = unpatchify(tokens[start:], grid, patch_size, f_patch_size, self.out_channels)
            start += len(segment.features)
        return image

    def _refine(
        self,
        image_seq: Sequences,
        cap_seq: Sequences,
        siglip_seq: Sequences | None,
        adaln_input: torch.Tensor,
        adaln_clean: torch.Tensor | None = None,
    ) -> Sequences:
        """The refiners, then one stream per sample, (B, L, D) (see `_stream_parts`)."""
        image_tokens, cap_tokens = image_seq.tokens, cap_seq.tokens
        for block in self.noise_refiner:
            image_tokens = block(
                image_tokens, image_seq.mask, image_seq.freqs_cis, adaln_input, image_seq.noise_mask, adaln_clean
            )
        for block in self.context_refiner:
            cap_tokens = block(cap_tokens, cap_seq.mask, cap_seq.freqs_cis)
        siglip_refined = None
        if siglip_seq is not None and image_seq.noise_mask is not None:
            siglip_tokens = siglip_seq.tokens
            for block in self.siglip_refiner:
                siglip_tokens = block(siglip_tokens, siglip_seq.mask, siglip_seq.freqs_cis)
            siglip_refined = replace(siglip_seq, tokens=siglip_tokens)
        parts = _stream_parts(
            replace(image_seq, tokens=image_tokens), replace(cap_seq, tokens=cap_tokens), siglip_refined
        )
        return unify(parts)

    def _embed(
        self, name: str, embedder: nn.Module, samples: list[list[Segment]], pad_token: torch.Tensor, omni: bool
    ) -> Sequences:
        """Per sample, its segments of one kind (argument `name`) -> embedded with the learned pad token, batched."""
        features = [torch.cat([s.features for s in segments]) for segments in samples]
        lengths = [len(f) for f in features]
        position_ids = [torch.cat([s.position_ids for s in segments]) for segments in samples]
        self._check_positions(name, position_ids)
        is_pad = torch.cat([s.is_pad for segments in samples for s in segments]).unsqueeze(-1)  # (sum Li, 1)
        tokens = torch.where(is_pad, pad_token, embedder(torch.cat(features))).split(lengths)  # (Li, D) each
        factors = self.rope_embedder(torch.cat(position_ids)).split([len(p) for p in position_ids])
        # A caption's ids outnumber its tokens (see `_caption_segment`): the extra ones are no token's.
        factors = [f[:n] for f, n in zip(factors, lengths, strict=True)]
        noise_masks = None
        if omni:
            device = features[0].device
            noise_masks = [
                torch.cat([torch.full((len(s.features),), s.noisy, dtype=torch.long, device=device) for s in segments])
                for segments in samples
            ]
        return pad_batch(list(tokens), factors, noise_masks)

    def _check_positions(self, name: str, position_ids: list[torch.Tensor]) -> None:
        """Every position id must index the RoPE tables (`axes_lens` rows per axis)."""
        for i, ids in enumerate(position_ids):
            if not len(ids):
                continue
            bounds = zip(ids.amax(0).tolist(), self.config.axes_lens, self.config.axes_dims, strict=True)
            for axis, (last, length, channels) in enumerate(bounds):
                if last >= length and channels:  # an axis of 0 channels reads no table row
                    raise ValueError(
                        f"{name}[{i}] needs RoPE position {last} on axis {axis} (its sample's captions, padded to "
                        f"multiples of {SEQ_MULTIPLE} tokens, come first on the time axis), but axes_lens[{axis}] "
                        f"is {length}: shorten the captions or the images"
                    )

    # ---- TeaCache seam ----------------------------------------------------------------------------

    def teacache_prelude(
        self,
        hidden_states: torch.Tensor,
        sequences: tuple[Sequences, Sequences, Sequences | None],
        adaln_input: torch.Tensor,
        adaln_clean: torch.Tensor | None,
        controlnet_block_samples: dict[int, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The refiners: the embedded image tokens `hidden_states` (B, Li, D) -> the joint stream (B, L, D).
        `sequences`: the embedded image, caption and (Omni mode) SigLIP tokens."""
        image, captions, siglip = sequences
        unified = self._refine(replace(image, tokens=hidden_states), captions, siglip, adaln_input, adaln_clean)
        return unified.tokens, dict(
            attn_mask=unified.mask,
            freqs_cis=unified.freqs_cis,
            adaln_input=adaln_input,
            controlnet_block_samples=controlnet_block_samples,
            noise_mask=unified.noise_mask,
            adaln_clean=adaln_clean,
        )

    def teacache_prelude_layout(
        self, hidden_states: torch.Tensor, sequences: tuple[Sequences, ...], **_: Any
    ) -> torch.Tensor:
        """(B, Li, D) image tokens -> the joint stream's layout (B, L, D), zeros where the captions sit."""
        return joint_layout(hidden_states, sequences[0].lengths, sequences[1].lengths)

    def teacache_indicator(
        self,
        hidden_states: torch.Tensor,
        adaln_input: torch.Tensor,
        noise_mask: torch.Tensor | None = None,
        adaln_clean: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        """The first block's attention_norm1 output scaled by (1 + scale_msa): (B, L, D). The block is the first
        main layer (`modulated_input`, on the joint stream) or the first noise-refiner block
        (`refiner_modulated_input`, on the image tokens, before the prelude)."""
        blocks = self.noise_refiner if self.teacache_indicator_name == _REFINER_INDICATOR else self.layers
        if not len(blocks):
            return hidden_states
        first = blocks[0]
        scale_msa = first.modulation_factors(adaln_input, noise_mask, adaln_clean)[0]
        return first.attention_norm1(hidden_states) * scale_msa

    def forward_blocks(
        self,
        hidden_states: torch.Tensor,
        attn_mask: torch.Tensor | None,
        freqs_cis: torch.Tensor,
        adaln_input: torch.Tensor,
        controlnet_block_samples: dict[int, torch.Tensor] | None = None,
        noise_mask: torch.Tensor | None = None,
        adaln_clean: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The main layers over the joint stream: (B, L, D) -> (B, L, D); in the Omni mode with the stream's
        (B, L) `noise_mask` and the clean conditioning `adaln_clean`."""
        for index, block in enumerate(self.layers):
            hidden_states = self.call_block(
                block, hidden_states, attn_mask, freqs_cis, adaln_input, noise_mask, adaln_clean
            )
            if controlnet_block_samples is not None and index in controlnet_block_samples:
                hidden_states = hidden_states + controlnet_block_samples[index]
        return hidden_states


def _cfg_halves(inputs: Inputs, controlnet_block_samples: dict[int, torch.Tensor] | None) -> list[tuple[bool, Inputs]]:
    """A call batching both CFG branches (the positive half of the batch, then the negative) -> (is_cfg_negative,
    that half's inputs) per branch."""
    batch = len(inputs.x)
    if batch % 2:
        raise ValueError(
            f"x has {batch} samples, but a batched_cfg=True call holds the positive then the negative half "
            "of the batch: its size must be even"
        )
    if controlnet_block_samples is not None:
        raise ValueError(
            "controlnet_block_samples cannot be split per CFG branch: with TeaCache on and batched_cfg=True, "
            "call the positive and the negative branch separately"
        )
    half = batch // 2
    return [(False, inputs.rows(slice(0, half))), (True, inputs.rows(slice(half, batch)))]


def _stream_parts(image: Sequences, captions: Sequences, siglip: Sequences | None) -> list[Sequences]:
    """The parts of each sample's joint stream, in order: image then caption tokens, or in the Omni mode
    caption, image and (when present) SigLIP tokens."""
    if image.noise_mask is None:
        return [image, captions]
    return [captions, image] if siglip is None else [captions, image, siglip]


def _check_architecture(args: dict[str, Any]) -> None:
    for name in ("all_patch_size", "all_f_patch_size", "axes_dims", "axes_lens"):
        value = args[name]
        if not isinstance(value, Sequence) or isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty sequence of positive integers, got {value!r}")
        # A RoPE axis may have 0 channels (it then rotates nothing), as in diffusers; the other lists are sizes.
        minimum = 0 if name == "axes_dims" else 1
        if not all(is_int(v, minimum) for v in value):
            kind = "non-negative" if minimum == 0 else "positive"
            raise ValueError(f"{name} must hold {kind} integers, got {value!r}")
    if len(args["all_patch_size"]) != len(args["all_f_patch_size"]):
        raise ValueError(
            f"all_patch_size {tuple(args['all_patch_size'])} and all_f_patch_size {tuple(args['all_f_patch_size'])} "
            "must have the same length (one (spatial, temporal) pair each)"
        )
    if len(args["axes_lens"]) != 3:
        raise ValueError(f"axes_lens must have 3 entries (time, height, width), got {tuple(args['axes_lens'])}")
    head_dim = args["dim"] // args["n_heads"]
    check_rope_axes(
        "axes_dims", args["axes_dims"], head_dim, num_axes=3, minimum=0, head_name="the head width dim // n_heads"
    )
    if isinstance(args["t_scale"], bool) or not isinstance(args["t_scale"], Real):
        raise ValueError(f"t_scale must be a number, got {args['t_scale']!r}")
