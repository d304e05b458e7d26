"""Z-Image (Turbo): the native transformer, with TeaCache on its main layer stack.

Architecture, parameter names and numerics follow diffusers' `ZImageTransformer2DModel`. Every sample
of a batch is a list entry of its own size: image latents are patchified into tokens, captions are
embedded, and both are padded to a multiple of 32 tokens with learned pad tokens. A timestep-modulated
noise refiner runs over the image tokens and an unmodulated context refiner over the caption tokens;
then one stream per sample (image tokens first, caption tokens after) passes the main `layers`, and the
image part goes through the final layer and is unpatchified back to (C, F, H, W).

TeaCache's default indicator (`modulated_input`, the published one) is the first main layer's
`attention_norm1` output scaled by (1 + scale_msa): it is computed after the refiners, so a skipped step
still runs them and skips only the main `layers`. The `refiner_modulated_input` indicator reads the same
quantity at the first noise-refiner block instead, so a skipped step skips the refiners too (it has no
published coefficients: fit them with `scripts/calibrate.py`).

Only the text-to-image mode is implemented: the Omni variant's inputs (nested lists of images,
`siglip_feats`, `image_noise_mask`) are refused with an error. A model built with `siglip_feat_dim`
still has the SigLIP weights, so its checkpoints load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from numbers import Real
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ..cache import TeaCacheMixin
from ..layers import RMSNorm, apply_rotary_complex, attention, linear_activation, timestep_sinusoids
from ..params import TeaCacheParams
from .base import ConfiguredModel, Transformer2DModelOutput, register_config
from .checks import check_architecture, check_rope_axes, check_tensor, is_int

__all__ = ["Z_IMAGE_TEACACHE_COEFFICIENTS", "ZImageTransformer2DModel"]

# A calibrated TeaCache fit for Z-Image(-Turbo) published by another engine, highest degree first.
Z_IMAGE_TEACACHE_COEFFICIENTS = (-7.54613422e01, -9.23596156e01, 5.75318402e01, -3.76790311e00, 2.27176809e-01)

# The timestep conditioning is at most 256 wide, whatever the model width.
_ADALN_EMBED_DIM = 256
_TIMESTEP_FEATURES = 256
_TIMESTEP_HIDDEN = 1024
# Every caption and image sequence is padded to a multiple of this many tokens.
_SEQ_MULTIPLE = 32
# The TeaCache indicator read before the refiners: a skipped step then skips them too.
_REFINER_INDICATOR = "refiner_modulated_input"


def _padding(length: int) -> int:
    return (-length) % _SEQ_MULTIPLE


def _grid_ids(size: tuple[int, int, int], start: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """(F, H, W) grid of 3-axis position ids starting at `start` -> (F * H * W, 3) int32, row-major."""
    axes = [torch.arange(s, s + n, dtype=torch.int32, device=device) for s, n in zip(start, size, strict=True)]
    return torch.stack(torch.meshgrid(axes, indexing="ij"), dim=-1).flatten(0, 2)


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
        return torch.cat([table[ids[:, axis]] for axis, table in enumerate(tables)], dim=-1)


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
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_k = nn.Linear(dim, inner_dim, bias=False)
        self.to_v = nn.Linear(dim, inner_dim, bias=False)
        self.norm_q = RMSNorm(head_dim, eps=1e-5) if qk_norm else None
        self.norm_k = RMSNorm(head_dim, eps=1e-5) if qk_norm else None
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
        self, adaln_input: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C) conditioning -> (1 + scale_msa), tanh(gate_msa), (1 + scale_mlp), tanh(gate_mlp), (B, 1, D) each."""
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln_input).unsqueeze(1).chunk(4, dim=2)
        return 1.0 + scale_msa, gate_msa.tanh(), 1.0 + scale_mlp, gate_mlp.tanh()

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        freqs_cis: torch.Tensor,
        adaln_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L, D) tokens -> (B, L, D); `adaln_input` (B, C) is required exactly when modulated."""
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), attn_mask, freqs_cis))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.modulation_factors(adaln_input)
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

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(B, L, D) tokens, (B, C) conditioning -> (B, L, out_channels)."""
        scale = 1.0 + self.adaLN_modulation(c)
        return self.linear(self.norm_final(x) * scale.unsqueeze(1))


@dataclasses.dataclass
class _Sequences:
    """One kind of token (image or caption) of a batch, padded to a common length."""

    tokens: torch.Tensor  # (B, L, D)
    freqs_cis: torch.Tensor  # (B, L, Dh / 2) complex
    mask: torch.Tensor | None  # (B, L) bool, None when every sample has length L
    lengths: list[int]


def _pad_batch(tokens: list[torch.Tensor], freqs_cis: list[torch.Tensor]) -> _Sequences:
    """Per-sample (Li, D) tokens and (Li, Dh / 2) factors -> zero-padded batch with a key mask if lengths differ."""
    lengths = [len(t) for t in tokens]
    longest = max(lengths)
    mask = None
    if any(n != longest for n in lengths):
        mask = torch.zeros((len(lengths), longest), dtype=torch.bool, device=tokens[0].device)
        for row, n in enumerate(lengths):
            mask[row, :n] = True
    return _Sequences(
        tokens=pad_sequence(tokens, batch_first=True, padding_value=0.0),
        freqs_cis=pad_sequence(freqs_cis, batch_first=True, padding_value=0.0),
        mask=mask,
        lengths=lengths,
    )


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
        siglip_feat_dim: width of the Omni variant's SigLIP features; its weights are built, its mode is not.
        rope_theta: RoPE base.
        t_scale: factor applied to `t` before the sinusoidal embedding.
        axes_dims: RoPE channels per position axis (time, height, width).
        axes_lens: number of positions per axis the RoPE tables cover.
    """

    teacache_default_coefficients = Z_IMAGE_TEACACHE_COEFFICIENTS
    supported_teacache_indicators = ("modulated_input", _REFINER_INDICATOR)

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
        axes_dims: tuple[int, ...] = (32, 48, 48),
        axes_lens: tuple[int, ...] = (1024, 512, 512),
    ) -> None:
        super().__init__()
        _check_architecture(locals())
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.dim = dim

        self.x_pad_token = nn.Parameter(torch.zeros((1, dim)))
        self.cap_pad_token = nn.Parameter(torch.zeros((1, dim)))
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
        self.layers = blocks(n_layers, modulation=True)
        self.rope_embedder = ZImageRopeEmbedder(rope_theta, tuple(axes_dims), tuple(axes_lens))

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
            x: B latents (in_channels, F, H, W); F, H, W divisible by the patch sizes. Sizes may differ.
            t: (B,) or (1,) timesteps, 1 - sigma in [0, 1] (scaled by `t_scale` inside).
            cap_feats: B caption features (L_i, cap_feat_dim), L_i >= 1; lengths may differ.
            return_dict: return a `Transformer2DModelOutput` instead of a tuple.
            controlnet_block_samples: {main layer index: (B, L, dim) residual added after that layer}.
            siglip_feats, image_noise_mask: Omni-mode inputs; not supported (must be None).
            patch_size, f_patch_size: a configured (spatial, temporal) patch size pair.
            joint_attention_kwargs: only `scale` (for LoRA layers, which this model has none of).

        Returns:
            A list of B predictions (in_channels, F, H, W), in a tuple or output object.
        """
        self._check_inputs(
            x, t, cap_feats, controlnet_block_samples, siglip_feats, image_noise_mask, patch_size, f_patch_size
        )
        if joint_attention_kwargs is not None:
            _check_joint_attention_kwargs(joint_attention_kwargs)
        if self.claim_batched_cfg_call():
            samples = self._predict_cfg_halves(x, t, cap_feats, controlnet_block_samples, patch_size, f_patch_size)
        else:
            samples = self._predict(x, t, cap_feats, controlnet_block_samples, patch_size, f_patch_size)
        return (samples,) if not return_dict else Transformer2DModelOutput(sample=samples)

    def _predict(
        self,
        images: list[torch.Tensor],
        t: torch.Tensor,
        cap_feats: list[torch.Tensor],
        controlnet_block_samples: dict[int, torch.Tensor] | None,
        patch_size: int,
        f_patch_size: int,
    ) -> list[torch.Tensor]:
        """Embed -> refiners -> main layers (TeaCache) -> final layer -> unpatchify."""
        key = f"{patch_size}-{f_patch_size}"
        device = images[0].device
        adaln_input = self.t_embedder(t * self.config.t_scale).type_as(images[0])  # (B, C)

        # Captions take time positions 1..Lc; the image of the sample follows on the time axis.
        cap_lengths = [len(c) + _padding(len(c)) for c in cap_feats]
        cap_ids = [_grid_ids((n, 1, 1), (1, 0, 0), device) for n in cap_lengths]
        patches, grids, image_ids = [], [], []
        for image, cap_length in zip(images, cap_lengths, strict=True):
            tokens, grid = _patchify(image, patch_size, f_patch_size)
            ids = _grid_ids(grid, (cap_length + 1, 0, 0), device)
            # Pad tokens sit at position (0, 0, 0).
            ids = torch.cat([ids, ids.new_zeros((_padding(len(ids)), 3))])
            patches.append(tokens)
            grids.append(grid)
            image_ids.append(ids)

        image_seq = self._embed(self.all_x_embedder[key], patches, image_ids, self.x_pad_token)
        cap_seq = self._embed(self.cap_embedder, cap_feats, cap_ids, self.cap_pad_token)
        if self.teacache_indicator_name == _REFINER_INDICATOR:
            # TeaCache's stack starts at the refiners: image tokens in, image tokens out.
            image_tokens = self.run_blocks(
                image_seq.tokens,
                attn_mask=image_seq.mask,
                freqs_cis=image_seq.freqs_cis,
                adaln_input=adaln_input,
                controlnet_block_samples=controlnet_block_samples,
                image_lengths=image_seq.lengths,
                captions=cap_seq.tokens,
                caption_mask=cap_seq.mask,
                caption_freqs_cis=cap_seq.freqs_cis,
                caption_lengths=cap_seq.lengths,
            )
            # The final layer reads the stream's layout; the caption rows it also computes are dropped.
            hidden_states = _joint_layout(image_tokens, image_seq.lengths, cap_seq.lengths)
        else:
            unified = self._refine(image_seq, cap_seq, adaln_input)
            hidden_states = self.run_blocks(
                unified.tokens,
                attn_mask=unified.mask,
                freqs_cis=unified.freqs_cis,
                adaln_input=adaln_input,
                controlnet_block_samples=controlnet_block_samples,
            )  # (B, L, D)

        output = self.all_final_layer[key](hidden_states, adaln_input)  # (B, L, p * p * pf * C)
        return [
            _unpatchify(sample, grid, patch_size, f_patch_size, self.out_channels)
            for sample, grid in zip(output.unbind(0), grids, strict=True)
        ]

    def _refine(self, image_seq: _Sequences, cap_seq: _Sequences, adaln_input: torch.Tensor) -> _Sequences:
        """Both refiners, then one stream per sample: image tokens first, then caption tokens, (B, L, D)."""
        for block in self.noise_refiner:
            image_seq.tokens = block(image_seq.tokens, image_seq.mask, image_seq.freqs_cis, adaln_input)
        for block in self.context_refiner:
            cap_seq.tokens = block(cap_seq.tokens, cap_seq.mask, cap_seq.freqs_cis)
        pairs = list(enumerate(zip(image_seq.lengths, cap_seq.lengths, strict=True)))
        return _pad_batch(
            [torch.cat([image_seq.tokens[i, :n], cap_seq.tokens[i, :m]]) for i, (n, m) in pairs],
            [torch.cat([image_seq.freqs_cis[i, :n], cap_seq.freqs_cis[i, :m]]) for i, (n, m) in pairs],
        )

    def _embed(
        self,
        embedder: nn.Module,
        sequences: list[torch.Tensor],
        position_ids: list[torch.Tensor],
        pad_token: torch.Tensor,
    ) -> _Sequences:
        """Pad each (Li, C) sequence to a multiple of 32 with the learned pad token, embed, batch."""
        pad_lengths = [_padding(len(s)) for s in sequences]
        # The embedder sees the last row repeated in the padding; those rows are then replaced.
        padded = [torch.cat([s, s[-1:].repeat(n, 1)]) for s, n in zip(sequences, pad_lengths, strict=True)]
        device = sequences[0].device
        is_pad = torch.cat(
            [torch.arange(len(s) + n, device=device) >= len(s) for s, n in zip(sequences, pad_lengths, strict=True)]
        )  # (sum Li,)
        tokens = torch.where(is_pad.unsqueeze(-1), pad_token, embedder(torch.cat(padded)))  # (sum Li, D)
        tokens = list(tokens.split([len(p) for p in padded]))
        freqs_cis = list(self.rope_embedder(torch.cat(position_ids)).split([len(p) for p in position_ids]))
        return _pad_batch(tokens, freqs_cis)

    def _predict_cfg_halves(
        self,
        images: list[torch.Tensor],
        t: torch.Tensor,
        cap_feats: list[torch.Tensor],
        controlnet_block_samples: dict[int, torch.Tensor] | None,
        patch_size: int,
        f_patch_size: int,
    ) -> list[torch.Tensor]:
        """A call batching both CFG branches: each half runs as its own branch, each with its own cache."""
        batch = len(images)
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
        samples: list[torch.Tensor] = []
        for negative, rows in ((False, slice(0, half)), (True, slice(half, batch))):
            branch_t = t[rows] if t.shape[0] == batch else t
            with self.teacache_branch(negative):
                samples += self._predict(images[rows], branch_t, cap_feats[rows], None, patch_size, f_patch_size)
        return samples

    # ---- TeaCache seam ----------------------------------------------------------------------------

    def teacache_schedule(self, params: TeaCacheParams) -> tuple[tuple[float, ...], int, int]:
        """As the mixin's, but the published coefficients are a fit for `modulated_input` only."""
        schedule = super().teacache_schedule(params)
        if params.indicator == _REFINER_INDICATOR and params.coefficients is None:
            raise ValueError(
                f"indicator {_REFINER_INDICATOR!r} has no preset coefficients (the published set is a fit for "
                "'modulated_input'); pass TeaCacheParams(coefficients=[...]) fitted for it "
                "(scripts/calibrate.py --indicator refiner_modulated_input)"
            )
        return schedule

    def teacache_indicator(self, hidden_states: torch.Tensor, adaln_input: torch.Tensor, **_: Any) -> torch.Tensor:
        """The first block's attention_norm1 output scaled by (1 + scale_msa): (B, L, D). The block is the first
        main layer (`modulated_input`) or the first noise-refiner block (`refiner_modulated_input`)."""
        blocks = self.noise_refiner if self.teacache_indicator_name == _REFINER_INDICATOR else self.layers
        if not len(blocks):
            return hidden_states
        first = blocks[0]
        scale_msa = first.modulation_factors(adaln_input)[0]
        return first.attention_norm1(hidden_states) * scale_msa

    def forward_blocks(
        self,
        hidden_states: torch.Tensor,
        attn_mask: torch.Tensor | None,
        freqs_cis: torch.Tensor,
        adaln_input: torch.Tensor,
        controlnet_block_samples: dict[int, torch.Tensor] | None = None,
        image_lengths: list[int] | None = None,
        captions: torch.Tensor | None = None,
        caption_mask: torch.Tensor | None = None,
        caption_freqs_cis: torch.Tensor | None = None,
        caption_lengths: list[int] | None = None,
    ) -> torch.Tensor:
        """The main layers over the unified stream: (B, L, D) -> (B, L, D).

        With `captions` (the `refiner_modulated_input` indicator), `hidden_states` are the embedded image
        tokens (`attn_mask`, `freqs_cis` and `image_lengths` theirs) and the stack begins with the refiners;
        the image tokens of the main layers' output are returned in the layout of `hidden_states`.
        """
        if captions is not None:
            image_seq = _Sequences(hidden_states, freqs_cis, attn_mask, image_lengths)
            cap_seq = _Sequences(captions, caption_freqs_cis, caption_mask, caption_lengths)
            unified = self._refine(image_seq, cap_seq, adaln_input)
            output = self._main_layers(
                unified.tokens, unified.mask, unified.freqs_cis, adaln_input, controlnet_block_samples
            )
            images = [output[i, :n] for i, n in enumerate(image_lengths)]
            return pad_sequence(images, batch_first=True, padding_value=0.0)
        return self._main_layers(hidden_states, attn_mask, freqs_cis, adaln_input, controlnet_block_samples)

    def _main_layers(
        self,
        hidden_states: torch.Tensor,
        attn_mask: torch.Tensor | None,
        freqs_cis: torch.Tensor,
        adaln_input: torch.Tensor,
        controlnet_block_samples: dict[int, torch.Tensor] | None,
    ) -> torch.Tensor:
        for index, block in enumerate(self.layers):
            hidden_states = block(hidden_states, attn_mask, freqs_cis, adaln_input)
            if controlnet_block_samples is not None and index in controlnet_block_samples:
                hidden_states = hidden_states + controlnet_block_samples[index]
        return hidden_states

    # ---- input validation -------------------------------------------------------------------------

    def _check_inputs(
        self,
        x: Any,
        t: Any,
        cap_feats: Any,
        controlnet_block_samples: Any,
        siglip_feats: Any,
        image_noise_mask: Any,
        patch_size: Any,
        f_patch_size: Any,
    ) -> None:
        config = self.config
        omni = "the Omni mode (nested image lists, siglip_feats, image_noise_mask) is not implemented"
        if siglip_feats is not None:
            raise ValueError(f"siglip_feats must be None: {omni}")
        if image_noise_mask is not None:
            raise ValueError(f"image_noise_mask must be None: {omni}")
        if not isinstance(x, list | tuple) or not x:
            raise TypeError(f"x must be a non-empty list of (C, F, H, W) latent tensors, got {type(x).__name__}")
        if any(isinstance(item, list | tuple) for item in x):
            raise ValueError(f"x must be a flat list of tensors: {omni}")
        if not isinstance(cap_feats, list | tuple):
            raise TypeError(
                f"cap_feats must be a list of (L, {config.cap_feat_dim}) tensors, got {type(cap_feats).__name__}"
            )
        if len(cap_feats) != len(x):
            raise ValueError(f"cap_feats must hold one tensor per sample of x ({len(x)}), got {len(cap_feats)}")
        pairs = set(zip(config.all_patch_size, config.all_f_patch_size, strict=True))
        if (patch_size, f_patch_size) not in pairs:
            raise ValueError(
                f"(patch_size, f_patch_size) = ({patch_size!r}, {f_patch_size!r}) is not configured; "
                f"choose one of {sorted(pairs)}"
            )
        axes_lens = config.axes_lens
        for i, (image, caption) in enumerate(zip(x, cap_feats, strict=True)):
            check_tensor(f"x[{i}]", image, (config.in_channels, "F", "H", "W"))
            frames, height, width = image.shape[1:]
            if frames % f_patch_size or height % patch_size or width % patch_size or not frames * height * width:
                raise ValueError(
                    f"x[{i}] has F, H, W = {frames}, {height}, {width}: each must be a positive multiple of its "
                    f"patch size (f_patch_size {f_patch_size}, patch_size {patch_size})"
                )
            if image.device != x[0].device:
                raise ValueError(f"x[{i}] is on {image.device}, x[0] on {x[0].device}: all must share one device")
            check_tensor(f"cap_feats[{i}]", caption, ("L", config.cap_feat_dim))
            if caption.shape[0] < 1:
                raise ValueError(
                    f"cap_feats[{i}] must hold at least one caption token, got shape {tuple(caption.shape)}"
                )
            if caption.device != image.device:
                raise ValueError(f"cap_feats[{i}] is on {caption.device}, x[{i}] on {image.device}: use one device")
            cap_length = caption.shape[0] + _padding(caption.shape[0])
            last_positions = (cap_length + frames // f_patch_size, height // patch_size - 1, width // patch_size - 1)
            for axis, (last, length) in enumerate(zip(last_positions, axes_lens, strict=True)):
                if last >= length:
                    raise ValueError(
                        f"sample {i} needs RoPE position {last} on axis {axis} (caption of {caption.shape[0]} tokens "
                        f"padded to {cap_length}, latent F, H, W = {frames}, {height}, {width}), but axes_lens[{axis}] "
                        f"is {length}: shorten the caption or the image"
                    )
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"t must be a tensor of shape ({len(x)},) or (1,), got {type(t).__name__}")
        if t.ndim != 1 or t.shape[0] not in (1, len(x)):
            raise ValueError(f"t must have shape ({len(x)},) or (1,), got {tuple(t.shape)}")
        if controlnet_block_samples is not None and not isinstance(controlnet_block_samples, dict):
            raise TypeError(
                "controlnet_block_samples must be None or a dict {layer index: tensor}, "
                f"got {type(controlnet_block_samples).__name__}"
            )


def _joint_layout(image_tokens: torch.Tensor, image_lengths: list[int], caption_lengths: list[int]) -> torch.Tensor:
    """(B, Li, D) image tokens -> the (B, L, D) layout of the joint stream, zeros where its captions sit."""
    rows = [
        torch.cat([image_tokens[i, :n], image_tokens.new_zeros((m, image_tokens.shape[-1]))])
        for i, (n, m) in enumerate(zip(image_lengths, caption_lengths, strict=True))
    ]
    return pad_sequence(rows, batch_first=True, padding_value=0.0)


def _patchify(image: torch.Tensor, patch_size: int, f_patch_size: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(C, F, H, W) -> tokens (F' * H' * W', pf * p * p * C) and the token grid (F', H', W')."""
    channels, frames, height, width = image.shape
    grid = (frames // f_patch_size, height // patch_size, width // patch_size)
    patches = image.reshape(channels, grid[0], f_patch_size, grid[1], patch_size, grid[2], patch_size)
    tokens = patches.permute(1, 3, 5, 2, 4, 6, 0).reshape(grid[0] * grid[1] * grid[2], -1)
    return tokens, grid


def _unpatchify(
    tokens: torch.Tensor, grid: tuple[int, int, int], patch_size: int, f_patch_size: int, channels: int
) -> torch.Tensor:
    """(L, pf * p * p * C) tokens of one sample (padding after the first F' * H' * W') -> (C, F, H, W)."""
    f, h, w = grid
    patches = tokens[: f * h * w].reshape(f, h, w, f_patch_size, patch_size, patch_size, channels)
    return patches.permute(6, 0, 3, 1, 4, 2, 5).reshape(channels, f * f_patch_size, h * patch_size, w * patch_size)


def _check_joint_attention_kwargs(kwargs: Any) -> None:
    if not isinstance(kwargs, dict) or set(kwargs) - {"scale"}:
        raise ValueError(
            f"joint_attention_kwargs may only hold 'scale' (ignored: this model has no LoRA layers), got {kwargs!r}"
        )


def _check_architecture(args: dict[str, Any]) -> None:
    check_architecture(
        args,
        positive=("in_channels", "dim", "n_heads", "n_kv_heads", "cap_feat_dim"),
        non_negative=("n_layers", "n_refiner_layers"),
        optional_positive=("siglip_feat_dim",),
        flags=("qk_norm",),
        positive_numbers=("norm_eps", "rope_theta"),
    )
    for name in ("all_patch_size", "all_f_patch_size", "axes_dims", "axes_lens"):
        value = args[name]
        if not isinstance(value, Sequence) or isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty sequence of positive integers, got {value!r}")
        if not all(is_int(v, 1) for v in value):
            raise ValueError(f"{name} must hold positive integers, got {value!r}")
    if len(args["all_patch_size"]) != len(args["all_f_patch_size"]):
        raise ValueError(
            f"all_patch_size {tuple(args['all_patch_size'])} and all_f_patch_size {tuple(args['all_f_patch_size'])} "
            "must have the same length (one (spatial, temporal) pair each)"
        )
    if len(args["axes_lens"]) != 3:
        raise ValueError(f"axes_lens must have 3 entries (time, height, width), got {tuple(args['axes_lens'])}")
    head_dim = args["dim"] // args["n_heads"]
    check_rope_axes("axes_dims", args["axes_dims"], head_dim, num_axes=3, head_name="the head width dim // n_heads")
    if isinstance(args["t_scale"], bool) or not isinstance(args["t_scale"], Real):
        raise ValueError(f"t_scale must be a number, got {args['t_scale']!r}")
