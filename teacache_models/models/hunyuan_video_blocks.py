"""HunyuanVideo's building blocks, shared by HunyuanVideo and HunyuanVideo-1.5 (bottom-up: modulation,
embeddings, attention, the token refiner, the dual- and single-stream blocks, then token helpers).

Parameter names and numerics follow diffusers' HunyuanVideo modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from ..checks import check_rope_axes
from ..distributed.sequence import SequenceParallel
from ..layers import (
    AdaLayerNormZero,
    AdaLayerNormZeroSingle,
    FeedForward,
    FP32LayerNorm,
    MLPEmbedder,
    MultiHeadAttentionBase,
    RMSNorm,
    apply_rotary_interleaved,
    attention,
    linear_activation,
    modulate,
    rope_cos_sin,
    timestep_sinusoids,
)

__all__ = [
    "QK_NORMS",
    "BlockInputs",
    "HunyuanVideoPatchEmbed",
    "HunyuanVideoRotaryPosEmbed",
    "HunyuanVideoSingleTransformerBlock",
    "HunyuanVideoTokenRefiner",
    "HunyuanVideoTransformerBlock",
    "Rope",
    "check_block_arguments",
    "check_text_mask",
    "joint_attention_mask",
    "unpatchify",
]


_TIMESTEP_FEATURES = 256
_EPS = 1e-6
# The query/key norms a block may apply per head.
QK_NORMS = (None, "layer_norm", "fp32_layer_norm", "rms_norm")

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: (L_img, head_dim) float32 each
# Token replace: the first frame's conditioning (B, D) and its number of tokens.
TokenReplace = tuple[torch.Tensor, int]


class BlockInputs(NamedTuple):
    """What every block of the stack reads besides the image and text streams: the conditioning (B, D), the key
    mask of the image+text attention (B, 1, 1, Li + Lt), the image tokens' rotary tables, and the first frame's
    own conditioning under token replace."""

    temb: torch.Tensor
    attention_mask: torch.Tensor
    rope: Rope
    token_replace: TokenReplace | None = None


def _qk_norm(kind: str | None, dim: int) -> nn.Module | None:
    if kind is None:
        return None
    if kind == "layer_norm":
        return nn.LayerNorm(dim, eps=_EPS)
    if kind == "fp32_layer_norm":
        return FP32LayerNorm(dim, elementwise_affine=False, bias=False, eps=_EPS)
    return RMSNorm(dim, eps=_EPS)


class _Modulation(NamedTuple):
    """One AdaLN shift/scale/gate set (B, D) each; under token replace, another set for the first frame."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor
    first_frame: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    first_frame_tokens: int = 0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Shift and scale normalised (B, L, D) tokens."""
        if self.first_frame is None:
            return modulate(x, self.shift, self.scale)
        n = self.first_frame_tokens
        shift, scale, _ = self.first_frame
        return torch.cat([modulate(x[:, :n], shift, scale), modulate(x[:, n:], self.shift, self.scale)], dim=1)

    def gated_add(self, x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """Residual update x + gate * update on (B, L, D) tokens."""
        if self.first_frame is None:
            return x + update * self.gate.unsqueeze(1)
        n = self.first_frame_tokens
        gate = self.first_frame[2]
        return torch.cat(
            [x[:, :n] + update[:, :n] * gate.unsqueeze(1), x[:, n:] + update[:, n:] * self.gate.unsqueeze(1)], dim=1
        )


def _modulations(
    linear: nn.Linear, silu: nn.Module, emb: torch.Tensor, count: int, token_replace: TokenReplace | None
) -> list[_Modulation]:
    """Project the conditioning (B, D) into `count` shift/scale/gate sets, with first-frame sets if asked."""
    chunks = linear(silu(emb)).chunk(3 * count, dim=1)
    first = [None] * count
    tokens = 0
    if token_replace is not None:
        replace_emb, tokens = token_replace
        tr = linear(silu(replace_emb)).chunk(3 * count, dim=1)
        first = [tr[3 * i : 3 * i + 3] for i in range(count)]
    return [_Modulation(*chunks[3 * i : 3 * i + 3], first[i], tokens) for i in range(count)]


class HunyuanVideoAdaLayerNormZero(AdaLayerNormZero):
    """AdaLN-Zero (shift, scale, gate for attention, then for the MLP), with optional token replace."""

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, token_replace: TokenReplace | None = None
    ) -> tuple[torch.Tensor, _Modulation, _Modulation]:
        """(B, L, D) tokens, (B, D) conditioning -> modulated tokens, attention set, MLP set."""
        attn, mlp = _modulations(self.linear, self.silu, emb, 2, token_replace)
        return attn.apply(self.norm(x)), attn, mlp


class HunyuanVideoAdaLayerNormZeroSingle(AdaLayerNormZeroSingle):
    """AdaLN-Zero of the single-stream blocks (one shift, scale, gate), with optional token replace."""

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, token_replace: TokenReplace | None = None
    ) -> tuple[torch.Tensor, _Modulation]:
        """(B, L, D) tokens, (B, D) conditioning -> modulated tokens, their set."""
        (mod,) = _modulations(self.linear, self.silu, emb, 1, token_replace)
        return mod.apply(self.norm(x)), mod


class HunyuanVideoConditionEmbedding(nn.Module):
    """Timestep (+ guidance) + pooled-text conditioning vector; also used inside the token refiner."""

    def __init__(self, embedding_dim: int, pooled_projection_dim: int, guidance_embeds: bool = False) -> None:
        super().__init__()
        self.timestep_embedder = MLPEmbedder(_TIMESTEP_FEATURES, embedding_dim)
        self.text_embedder = MLPEmbedder(pooled_projection_dim, embedding_dim)
        self.guidance_embedder = MLPEmbedder(_TIMESTEP_FEATURES, embedding_dim) if guidance_embeds else None

    @staticmethod
    def _embed(embedder: MLPEmbedder, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return embedder(timestep_sinusoids(t, _TIMESTEP_FEATURES).to(dtype))

    def forward(
        self,
        timestep: torch.Tensor,
        pooled_projection: torch.Tensor,
        guidance: torch.Tensor | None = None,
        token_replace: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Timestep / guidance (B,) or (1,) in [0, 1000], pooled (B, P) -> conditioning (B, D), first-frame one."""
        dtype = pooled_projection.dtype
        pooled = self.text_embedder(pooled_projection)
        conditioning = self._embed(self.timestep_embedder, timestep, dtype)
        if self.guidance_embedder is not None:
            conditioning = conditioning + self._embed(self.guidance_embedder, guidance, dtype)
        conditioning = conditioning + pooled
        if not token_replace:
            return conditioning, None
        # The first frame is the clean conditioning image: it is embedded at timestep 0, without guidance.
        replace = self._embed(self.timestep_embedder, torch.zeros_like(timestep), dtype) + pooled
        return conditioning, replace


class HunyuanVideoPatchEmbed(nn.Module):
    """(B, C, F, H, W) latents -> (B, F' * H' * W', D) tokens, frame-major."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class HunyuanVideoRotaryPosEmbed(nn.Module):
    """3-axis RoPE (frame, row, column) over the patch grid, angles in float32."""

    def __init__(self, rope_dim: tuple[int, int, int], theta: float) -> None:
        super().__init__()
        self.rope_dim = tuple(rope_dim)
        self.theta = theta

    def forward(self, grid: tuple[int, int, int], device: torch.device) -> Rope:
        """Patch grid (F', H', W') -> cos, sin of shape (F' * H' * W', sum(rope_dim))."""
        axes = [torch.arange(n, device=device, dtype=torch.float32) for n in grid]
        positions = [p.reshape(-1) for p in torch.meshgrid(*axes, indexing="ij")]
        per_axis = [
            rope_cos_sin(dim, pos, self.theta, freqs_dtype=torch.float32)
            for dim, pos in zip(self.rope_dim, positions, strict=True)
        ]
        return torch.cat([c for c, _ in per_axis], dim=1), torch.cat([s for _, s in per_axis], dim=1)


class HunyuanVideoAttention(MultiHeadAttentionBase):
    """Multi-head attention with optional QK norm; with `joint=True` it also projects the text stream.

    `sequence_parallel` (set by `HunyuanVideoTransformer3DModel.enable_sequence_parallel`) makes the
    image+text attention of the blocks attend over every rank's shard of the image tokens.
    """

    sequence_parallel: SequenceParallel | None = None

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        qk_norm: str | None = None,
        joint: bool = False,
        pre_only: bool = False,
    ) -> None:
        super().__init__(num_heads, head_dim)
        inner_dim = self.inner_dim
        # Submodules are created in diffusers' order (its `Attention` makes the text projections k, v, q),
        # so that a seeded construction draws the same weights and the state_dict keys come in its order.
        self.norm_q = _qk_norm(qk_norm, head_dim)
        self.norm_k = _qk_norm(qk_norm, head_dim)
        self.to_q = nn.Linear(dim, inner_dim)
        self.to_k = nn.Linear(dim, inner_dim)
        self.to_v = nn.Linear(dim, inner_dim)
        if joint:
            self.add_k_proj = nn.Linear(dim, inner_dim)
            self.add_v_proj = nn.Linear(dim, inner_dim)
            self.add_q_proj = nn.Linear(dim, inner_dim)
        if not pre_only:
            # Index 1 (dropout at training time) holds no weights; it keeps the key `to_out.0`.
            self.to_out = nn.ModuleList([nn.Linear(inner_dim, dim), nn.Identity()])
        if joint:
            self.to_add_out = nn.Linear(inner_dim, dim)
            self.norm_added_q = _qk_norm(qk_norm, head_dim)
            self.norm_added_k = _qk_norm(qk_norm, head_dim)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            self.project_heads(self.to_q, self.norm_q, x),
            self.project_heads(self.to_k, self.norm_k, x),
            self.project_heads(self.to_v, None, x),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Projected self-attention of (B, L, D) tokens (the refiner's), no RoPE."""
        return self.to_out[0](attention(*self._qkv(x), attn_mask=mask))

    def joint_attention(
        self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, rope: Rope
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (B, Li, D) and text (B, Lt, D) attend jointly, image first -> projected image, text outputs."""
        q, k, v = self._qkv(image)
        q, k = apply_rotary_interleaved(q, *rope), apply_rotary_interleaved(k, *rope)
        q = torch.cat([q, self.project_heads(self.add_q_proj, self.norm_added_q, text)], dim=1)  # (B, Li + Lt, H, Dh)
        k = torch.cat([k, self.project_heads(self.add_k_proj, self.norm_added_k, text)], dim=1)
        v = torch.cat([v, self.project_heads(self.add_v_proj, None, text)], dim=1)
        out = self._attend(q, k, v, mask, replicated=text.shape[1])  # (B, Li + Lt, H * Dh)
        image_len = image.shape[1]
        return self.to_out[0](out[:, :image_len]), self.to_add_out(out[:, image_len:])

    def joined_attention(self, tokens: torch.Tensor, image_len: int, mask: torch.Tensor, rope: Rope) -> torch.Tensor:
        """Attention over joined (B, Li + Lt, D) tokens, RoPE on the first `image_len` -> (B, Li + Lt, H * Dh)."""
        q, k, v = self._qkv(tokens)
        q = torch.cat([apply_rotary_interleaved(q[:, :image_len], *rope), q[:, image_len:]], dim=1)
        k = torch.cat([apply_rotary_interleaved(k[:, :image_len], *rope), k[:, image_len:]], dim=1)
        return self._attend(q, k, v, mask, replicated=tokens.shape[1] - image_len)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, replicated: int
    ) -> torch.Tensor:
        """Image tokens then `replicated` text tokens (B, Li + Lt, H, Dh) -> (B, Li + Lt, H * Dh); under
        sequence parallelism the image tokens are this rank's shard and the text tokens are on every rank."""
        if self.sequence_parallel is None:
            return attention(q, k, v, attn_mask=mask)
        return self.sequence_parallel.attention(q, k, v, attn_mask=mask, replicated=replicated)


class _LinearSiLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_activation(self.proj, x, "silu")


class HunyuanVideoRefinerFeedForward(nn.Module):
    """Linear -> SiLU -> Linear, under the checkpoint keys `net.0.proj` and `net.2`."""

    def __init__(self, dim: int, inner_dim: int) -> None:
        super().__init__()
        # Index 1 (dropout at training time) holds no weights; it keeps the key `net.2`.
        self.net = nn.ModuleList([_LinearSiLU(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            x = module(x)
        return x


class HunyuanVideoAdaNorm(nn.Module):
    """The refiner's gates: SiLU -> Linear of the conditioning, chunked as attention gate, MLP gate."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.nonlinearity = nn.SiLU()

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate_msa, gate_mlp = self.linear(self.nonlinearity(emb)).chunk(2, dim=1)
        return gate_msa.unsqueeze(1), gate_mlp.unsqueeze(1)  # (B, 1, D) each


class HunyuanVideoIndividualTokenRefinerBlock(nn.Module):
    """Pre-norm self-attention + SiLU MLP over text tokens, gated by the conditioning."""

    def __init__(self, num_heads: int, head_dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        dim = num_heads * head_dim
        self.norm1 = nn.LayerNorm(dim, eps=_EPS)
        self.attn = HunyuanVideoAttention(dim, num_heads, head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=_EPS)
        self.ff = HunyuanVideoRefinerFeedForward(dim, int(dim * mlp_ratio))
        self.norm_out = HunyuanVideoAdaNorm(dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Text (B, Lt, D), conditioning (B, D), mask (B, 1, Lt, Lt) or None -> text (B, Lt, D)."""
        attn = self.attn(self.norm1(x), mask)
        gate_msa, gate_mlp = self.norm_out(temb)
        x = x + attn * gate_msa
        return x + self.ff(self.norm2(x)) * gate_mlp


class HunyuanVideoIndividualTokenRefiner(nn.Module):
    """`attend_first_token`: every query may also attend to token 0, so that padded queries have one key
    and their (discarded) softmax stays finite (HunyuanVideo); HunyuanVideo-1.5 does without."""

    def __init__(self, num_heads: int, head_dim: int, num_layers: int, attend_first_token: bool = True) -> None:
        super().__init__()
        self.attend_first_token = attend_first_token
        self.refiner_blocks = nn.ModuleList(
            [HunyuanVideoIndividualTokenRefinerBlock(num_heads, head_dim) for _ in range(num_layers)]
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text (B, Lt, D), conditioning (B, D), boolean text mask (B, Lt) or None -> text (B, Lt, D)."""
        square = None
        if mask is not None:
            square = mask[:, None, None, :] & mask[:, None, :, None]  # (B, 1, Lt, Lt): valid attends valid
            if self.attend_first_token:
                square[:, :, :, 0] = True
        for block in self.refiner_blocks:
            x = block(x, temb, square)
        return x


class HunyuanVideoTokenRefiner(nn.Module):
    """Text encoder states -> refined text tokens, conditioned on the timestep and their masked mean."""

    def __init__(
        self, in_channels: int, num_heads: int, head_dim: int, num_layers: int, attend_first_token: bool = True
    ) -> None:
        super().__init__()
        dim = num_heads * head_dim
        self.time_text_embed = HunyuanVideoConditionEmbedding(dim, in_channels)
        self.proj_in = nn.Linear(in_channels, dim)
        self.token_refiner = HunyuanVideoIndividualTokenRefiner(num_heads, head_dim, num_layers, attend_first_token)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text (B, Lt, text_embed_dim), timestep (B,) or (1,), 0/1 mask (B, Lt) or None -> text (B, Lt, D)."""
        if mask is None:
            pooled = x.mean(dim=1)
        else:
            weights = mask.float().unsqueeze(-1)  # (B, Lt, 1)
            pooled = ((x * weights).sum(dim=1) / weights.sum(dim=1)).to(x.dtype)  # (B, text_embed_dim)
        temb, _ = self.time_text_embed(timestep, pooled)
        return self.token_refiner(self.proj_in(x), temb, None if mask is None else mask.bool())


class HunyuanVideoTransformerBlock(nn.Module):
    """Dual-stream block: separate AdaLN and MLP per stream, one joint attention (image first)."""

    def __init__(self, num_heads: int, head_dim: int, mlp_ratio: float, qk_norm: str | None) -> None:
        super().__init__()
        dim = num_heads * head_dim
        self.norm1 = HunyuanVideoAdaLayerNormZero(dim)
        self.norm1_context = HunyuanVideoAdaLayerNormZero(dim)
        self.attn = HunyuanVideoAttention(dim, num_heads, head_dim, qk_norm, joint=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=_EPS)
        self.ff = FeedForward(dim, mult=mlp_ratio, activation_fn="gelu-approximate")
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=_EPS)
        self.ff_context = FeedForward(dim, mult=mlp_ratio, activation_fn="gelu-approximate")

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, inputs: BlockInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (B, Li, D), text (B, Lt, D) -> updated image, text."""
        norm_x, x_attn, x_mlp = self.norm1(hidden_states, inputs.temb, inputs.token_replace)
        norm_c, c_attn, c_mlp = self.norm1_context(encoder_hidden_states, inputs.temb)
        attn_x, attn_c = self.attn.joint_attention(norm_x, norm_c, inputs.attention_mask, inputs.rope)

        hidden_states = x_attn.gated_add(hidden_states, attn_x)
        ff_x = self.ff(x_mlp.apply(self.norm2(hidden_states)))
        hidden_states = x_mlp.gated_add(hidden_states, ff_x)

        encoder_hidden_states = c_attn.gated_add(encoder_hidden_states, attn_c)
        ff_c = self.ff_context(c_mlp.apply(self.norm2_context(encoder_hidden_states)))
        encoder_hidden_states = c_mlp.gated_add(encoder_hidden_states, ff_c)
        return hidden_states, encoder_hidden_states


class HunyuanVideoSingleTransformerBlock(nn.Module):
    """Single-stream block over joined image+text tokens: attention and MLP in parallel."""

    def __init__(self, num_heads: int, head_dim: int, mlp_ratio: float, qk_norm: str | None) -> None:
        super().__init__()
        dim = num_heads * head_dim
        mlp_dim = int(dim * mlp_ratio)
        self.attn = HunyuanVideoAttention(dim, num_heads, head_dim, qk_norm, pre_only=True)
        self.norm = HunyuanVideoAdaLayerNormZeroSingle(dim)
        self.proj_mlp = nn.Linear(dim, mlp_dim)
        self.proj_out = nn.Linear(dim + mlp_dim, dim)

    def forward(self, tokens: torch.Tensor, image_len: int, inputs: BlockInputs) -> torch.Tensor:
        """Joined tokens (B, Li + Lt, D), image first -> updated tokens."""
        norm_x, mod = self.norm(tokens, inputs.temb, inputs.token_replace)
        mlp = linear_activation(self.proj_mlp, norm_x, "gelu_tanh")
        attn = self.attn.joined_attention(norm_x, image_len, inputs.attention_mask, inputs.rope)
        return mod.gated_add(tokens, self.proj_out(torch.cat([attn, mlp], dim=2)))


def joint_attention_mask(text_mask: torch.Tensor, image_len: int) -> torch.Tensor:
    """Boolean key mask (B, 1, 1, Li + Lt) for the image+text attention.

    As in the reference, only the number of valid text tokens counts: the first that many text tokens
    are attended, wherever the mask's ones are (tokenizers pad on the right, so they coincide).
    """
    text_len = text_mask.shape[1]
    valid = image_len + text_mask.sum(dim=1, dtype=torch.int)  # (B,)
    positions = torch.arange(image_len + text_len, device=text_mask.device)
    return (positions[None, :] < valid[:, None])[:, None, None, :]


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """Frame-major patch tokens (B, F' * H' * W', p_t * p * p * C) -> video (B, C, F' * p_t, H' * p, W' * p)."""
    video = tokens.reshape(tokens.shape[0], *grid, -1, *patch)
    video = video.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, F', p_t, H', p, W', p)
    return video.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def check_block_arguments(args: Mapping[str, Any], qk_norms: tuple[str | None, ...] = QK_NORMS) -> None:
    """What HunyuanVideo and HunyuanVideo-1.5 check of their constructor arguments beyond the types that
    `register_config` checks: the blocks' MLP width and query/key norm (one of `qk_norms`), and the RoPE axes."""
    inner_dim = args["num_attention_heads"] * args["attention_head_dim"]
    if int(inner_dim * args["mlp_ratio"]) < 1:
        raise ValueError(f"mlp_ratio {args['mlp_ratio']} leaves no MLP channels at width {inner_dim}")
    if args["qk_norm"] not in qk_norms:
        raise ValueError(f"qk_norm must be one of {list(qk_norms)}, got {args['qk_norm']!r}")
    # An axis may get no channels (frame-less variants), hence minimum 0.
    check_rope_axes("rope_axes_dim", args["rope_axes_dim"], args["attention_head_dim"], num_axes=3, minimum=0)


def check_text_mask(mask: Any, text: torch.Tensor) -> torch.Tensor:
    shape = tuple(text.shape[:2])
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=text.device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"encoder_attention_mask must be None or a tensor of shape {shape}, got {type(mask).__name__}")
    if tuple(mask.shape) != shape:
        raise ValueError(
            f"encoder_attention_mask must have shape {shape} (batch, text tokens of encoder_hidden_states), "
            f"got {tuple(mask.shape)}"
        )
    if torch.compiler.is_compiling():
        return mask  # reading values would break the graph at every call; eager calls check them
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("encoder_attention_mask must hold only 0 and 1 (or be boolean)")
    if not bool(mask.bool().any(dim=1).all()):
        raise ValueError("encoder_attention_mask must mark at least one valid text token in every row")
    return mask
