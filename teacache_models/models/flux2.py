"""FLUX.2 (dev, klein): the native transformer, with TeaCache on its block stack.

Architecture, parameter names and numerics follow diffusers' `Flux2Transformer2DModel`. Against FLUX.1
(`flux.py`, whose RoPE and joint attention it reuses): no pooled text embedding, the timestep (and guidance)
embedding drives three modulations shared by every block instead of one AdaLN per block, no biases,
SwiGLU MLPs, single-stream blocks whose QKV and MLP input (and outputs) are one fused projection, and
four RoPE axes (theta 2000). Reference images for editing are more image tokens appended to
`hidden_states` with their own position ids; the model needs nothing else for them.

The key/value cache of FLUX.2 [klein] KV: at the first step (`kv_cache_mode="extract"`) reference tokens
lead `hidden_states`, are modulated at a fixed timestep, attend only to themselves, and each layer keeps
their keys and values; later steps (`"cached"`) carry only the text and noisy image tokens and read the
reference keys and values from the cache.

TeaCache skips both block stacks; its indicator is the first block's modulated image input (the image
tokens after the shared double-stream modulation).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from ..cache import Deferred, TeaCacheMixin
from ..checks import (
    batch_vector,
    check_attention_kwargs,
    check_dtype,
    check_guidance,
    check_rope_axes,
    check_tokens,
)
from ..layers import (
    AdaLayerNormContinuous,
    KVLayerCache,
    MLPEmbedder,
    apply_rotary_interleaved,
    attention,
    clip_fp16,
    timestep_sinusoids,
)
from ..lora import lora_scale_from
from .base import ConfiguredModel, ModelOutput, register_config
from .flux import FluxAttention, FluxPosEmbed, Rope

__all__ = ["Flux2KVCache", "Flux2KVLayerCache", "Flux2Transformer2DModel", "Flux2Transformer2DModelOutput"]

KV_CACHE_MODES = ("extract", "cached")


# ---- the reference key/value cache (FLUX.2 [klein] KV) ----------------------------------------------


class Flux2KVLayerCache(KVLayerCache):
    """One layer's rotated reference keys and values, (B, L_ref, H, Dh) each, as `k_ref` and `v_ref`."""

    key_name = "k_ref"
    value_name = "v_ref"


class Flux2KVCache:
    """Every layer's reference keys and values, as an `extract` call returns them (diffusers' interface)."""

    def __init__(self, num_double_layers: int, num_single_layers: int) -> None:
        self.double_block_caches = [Flux2KVLayerCache() for _ in range(num_double_layers)]
        self.single_block_caches = [Flux2KVLayerCache() for _ in range(num_single_layers)]
        self.num_ref_tokens = 0

    def get_double(self, layer_idx: int) -> Flux2KVLayerCache:
        return self.double_block_caches[layer_idx]

    def get_single(self, layer_idx: int) -> Flux2KVLayerCache:
        return self.single_block_caches[layer_idx]

    def clear(self) -> None:
        for layer in (*self.double_block_caches, *self.single_block_caches):
            layer.clear()
        self.num_ref_tokens = 0


@dataclasses.dataclass(eq=False)
class Flux2Transformer2DModelOutput(ModelOutput):
    """The `return_dict=True` result: `sample`, and the filled `kv_cache` of an `extract` call."""

    sample: torch.Tensor
    kv_cache: Flux2KVCache | None = None


@dataclasses.dataclass(frozen=True)
class _LayerKV:
    """What one layer's attention does with reference tokens: `extract_into` stores the keys and values of the
    `num_ref` reference tokens that follow the text (which then attend only to themselves); `cached` holds
    keys and values (B, L_ref, H, Dh) to insert after the text's."""

    num_ref: int = 0
    extract_into: Flux2KVLayerCache | None = None
    cached: tuple[torch.Tensor, torch.Tensor] | None = None


def _kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_len: int, kv: _LayerKV) -> torch.Tensor:
    """Attention over [text, (reference,) image] tokens (B, L, H, Dh) -> (B, L, H * Dh)."""
    if kv.cached is not None:
        k_ref, v_ref = kv.cached
        k = torch.cat([k[:, :text_len], k_ref, k[:, text_len:]], dim=1)
        v = torch.cat([v[:, :text_len], v_ref, v[:, text_len:]], dim=1)
        return attention(q, k, v)
    if not kv.num_ref:
        return attention(q, k, v)
    ref = slice(text_len, text_len + kv.num_ref)
    if kv.extract_into is not None:
        kv.extract_into.store(k[:, ref].clone(), v[:, ref].clone())
    # Text and image tokens see everything; reference tokens see only themselves, so their keys and values do
    # not depend on the noisy image and stay valid for every later step.
    main = attention(torch.cat([q[:, :text_len], q[:, ref.stop :]], dim=1), k, v)  # (B, Lt + Li, H * Dh)
    refs = attention(q[:, ref], k[:, ref], v[:, ref])  # (B, Lr, H * Dh)
    return torch.cat([main[:, :text_len], refs, main[:, text_len:]], dim=1)


# ---- layers ---------------------------------------------------------------------------------------


def _split_modulation(mod: torch.Tensor, sets: int) -> list[tuple[torch.Tensor, ...]]:
    """A modulation (B, 3 * sets * D), or one per token (B, L, ...), -> `sets` (shift, scale, gate) triples of
    (B, 1 or L, D)."""
    params = (mod if mod.ndim == 3 else mod.unsqueeze(1)).chunk(3 * sets, dim=-1)
    return [params[3 * i : 3 * i + 3] for i in range(sets)]


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(1 + scale) * x + shift, the modulation broadcast over the tokens or given per token."""
    return (1 + scale) * x + shift


class Flux2TimestepGuidanceEmbeddings(nn.Module):
    """Timestep (+ guidance) embedding: the one conditioning vector of every modulation."""

    def __init__(self, in_channels: int, embedding_dim: int, guidance_embeds: bool) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.timestep_embedder = MLPEmbedder(in_channels, embedding_dim, bias=False)
        self.guidance_embedder = MLPEmbedder(in_channels, embedding_dim, bias=False) if guidance_embeds else None

    def forward(self, timestep: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """Timestep and guidance already scaled to [0, 1000], (B,) or (1,) -> (B or 1, D)."""
        embedding = self.timestep_embedder(timestep_sinusoids(timestep, self.in_channels).to(timestep.dtype))
        if guidance is None or self.guidance_embedder is None:
            return embedding
        return embedding + self.guidance_embedder(timestep_sinusoids(guidance, self.in_channels).to(guidance.dtype))


class Flux2Modulation(nn.Module):
    """SiLU -> Linear: `mod_param_sets` (shift, scale, gate) triples shared by a whole block stack."""

    def __init__(self, dim: int, mod_param_sets: int) -> None:
        super().__init__()
        self.mod_param_sets = mod_param_sets
        self.linear = nn.Linear(dim, dim * 3 * mod_param_sets, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        return self.linear(self.act_fn(temb))


class Flux2FeedForward(nn.Module):
    """SwiGLU MLP: one projection holds the gate and the value halves."""

    def __init__(self, dim: int, mult: float) -> None:
        super().__init__()
        inner_dim = int(dim * mult)
        self.linear_in = nn.Linear(dim, 2 * inner_dim, bias=False)
        self.linear_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_out(_swiglu(self.linear_in(x)))


def _swiglu(x: torch.Tensor) -> torch.Tensor:
    gate, value = x.chunk(2, dim=-1)
    return nn.functional.silu(gate) * value


class Flux2ParallelSelfAttention(nn.Module):
    """The single-stream block's attention and MLP, in parallel: one projection in, one projection out."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.inner_dim = num_heads * head_dim
        mlp_hidden_dim = int(dim * mlp_ratio)
        self.to_qkv_mlp_proj = nn.Linear(dim, 3 * self.inner_dim + 2 * mlp_hidden_dim, bias=False)
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_out = nn.Linear(self.inner_dim + mlp_hidden_dim, dim, bias=False)

    def forward(self, tokens: torch.Tensor, rope: Rope, text_len: int, kv: _LayerKV) -> torch.Tensor:
        """Modulated joined tokens (B, L, D) -> attention and MLP outputs projected, (B, L, D)."""
        projected = self.to_qkv_mlp_proj(tokens)
        qkv, mlp = projected.split([3 * self.inner_dim, projected.shape[-1] - 3 * self.inner_dim], dim=-1)
        q, k, v = (x.unflatten(-1, (-1, self.head_dim)) for x in qkv.chunk(3, dim=-1))  # (B, L, H, Dh)
        q = apply_rotary_interleaved(self.norm_q(q), *rope)
        k = apply_rotary_interleaved(self.norm_k(k), *rope)
        out = _kv_attention(q, k, v, text_len, kv)  # (B, L, H * Dh)
        return self.to_out(torch.cat([out, _swiglu(mlp)], dim=-1))


class Flux2TransformerBlock(nn.Module):
    """Dual-stream block: per-stream norms and MLPs, one joint attention, modulations handed in."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.norm1_context = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.attn = FluxAttention(
            dim, num_attention_heads, attention_head_dim, eps, added_kv_proj_dim=dim, bias=False, qk_norms_first=False
        )
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.ff = Flux2FeedForward(dim, mlp_ratio)
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.ff_context = Flux2FeedForward(dim, mlp_ratio)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        mod_img: torch.Tensor,
        mod_txt: torch.Tensor,
        rope: Rope,
        kv: _LayerKV,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (B, Li, D), text (B, Lt, D), modulations (B, 6D) or per image token (B, Li, 6D) -> image, text."""
        (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = _split_modulation(mod_img, 2)
        (c_shift_msa, c_scale_msa, c_gate_msa), (c_shift_mlp, c_scale_mlp, c_gate_mlp) = _split_modulation(mod_txt, 2)
        norm_x = _modulate(self.norm1(hidden_states), shift_msa, scale_msa)
        norm_c = _modulate(self.norm1_context(encoder_hidden_states), c_shift_msa, c_scale_msa)
        text_len = encoder_hidden_states.shape[1]
        q, k, v = self.attn.joint_qkv(norm_x, norm_c, rope)  # (B, Lt + Li, H, Dh) each
        attn_x, attn_c = self.attn.joint_out(_kv_attention(q, k, v, text_len, kv), text_len)

        hidden_states = hidden_states + gate_msa * attn_x
        ff_x = self.ff(_modulate(self.norm2(hidden_states), shift_mlp, scale_mlp))
        hidden_states = hidden_states + gate_mlp * ff_x

        encoder_hidden_states = encoder_hidden_states + c_gate_msa * attn_c
        ff_c = self.ff_context(_modulate(self.norm2_context(encoder_hidden_states), c_shift_mlp, c_scale_mlp))
        encoder_hidden_states = clip_fp16(encoder_hidden_states + c_gate_mlp * ff_c)
        return hidden_states, encoder_hidden_states


class Flux2SingleTransformerBlock(nn.Module):
    """Single-stream block over the joined text+image tokens."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.attn = Flux2ParallelSelfAttention(dim, num_attention_heads, attention_head_dim, mlp_ratio, eps)

    def forward(self, tokens: torch.Tensor, mod: torch.Tensor, rope: Rope, text_len: int, kv: _LayerKV) -> torch.Tensor:
        """Joined tokens (B, Lt + Li, D), modulation (B, 3D) or per token -> updated tokens."""
        ((shift, scale, gate),) = _split_modulation(mod, 1)
        update = self.attn(_modulate(self.norm(tokens), shift, scale), rope, text_len, kv)
        return clip_fp16(tokens + gate * update)


# ---- the model ------------------------------------------------------------------------------------


class Flux2Transformer2DModel(ConfiguredModel, TeaCacheMixin):
    """The FLUX.2 transformer (diffusers layout and keyword arguments) with TeaCache.

    Args:
        patch_size: patch size of the output projection (the pipeline packs 2x2 latents into tokens).
        in_channels: channels of an image token.
        out_channels: channels predicted per token (default `in_channels`).
        num_layers: dual-stream blocks.
        num_single_layers: single-stream blocks.
        attention_head_dim: channels per head; must equal `sum(axes_dims_rope)`.
        num_attention_heads: heads.
        joint_attention_dim: width of the text encoder states.
        timestep_guidance_channels: sinusoidal features of the timestep and guidance.
        mlp_ratio: MLP width as a multiple of the model width.
        axes_dims_rope: RoPE channels per position-id axis.
        rope_theta: the RoPE base.
        eps: epsilon of every LayerNorm and RMSNorm.
        guidance_embeds: the model embeds a guidance scale (FLUX.2 [dev]) or not ([klein]).
    """

    _no_split_modules: ClassVar[list[str]] = ["Flux2TransformerBlock", "Flux2SingleTransformerBlock"]
    _skip_layerwise_casting_patterns: ClassVar[list[str]] = ["pos_embed", "norm"]
    _repeated_blocks: ClassVar[list[str]] = ["Flux2TransformerBlock", "Flux2SingleTransformerBlock"]

    # Per-sample TeaCache gathers these by batch row; the rotary tables and the reference layout are shared.
    teacache_row_inputs = frozenset({"encoder_hidden_states", "mod_img", "mod_txt", "mod_single", "cached_kv"})

    @register_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 128,
        out_channels: int | None = None,
        num_layers: int = 8,
        num_single_layers: int = 48,
        attention_head_dim: int = 128,
        num_attention_heads: int = 48,
        joint_attention_dim: int = 15360,
        timestep_guidance_channels: int = 256,
        mlp_ratio: float = 3.0,
        axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32),
        rope_theta: float = 2000,
        eps: float = 1e-6,
        guidance_embeds: bool = True,
    ) -> None:
        super().__init__()
        check_rope_axes("axes_dims_rope", axes_dims_rope, attention_head_dim, minimum=0)
        self.out_channels = out_channels or in_channels
        self.inner_dim = num_attention_heads * attention_head_dim
        dim = self.inner_dim

        self.pos_embed = FluxPosEmbed(theta=rope_theta, axes_dim=tuple(axes_dims_rope))
        self.time_guidance_embed = Flux2TimestepGuidanceEmbeddings(timestep_guidance_channels, dim, guidance_embeds)
        self.double_stream_modulation_img = Flux2Modulation(dim, mod_param_sets=2)
        self.double_stream_modulation_txt = Flux2Modulation(dim, mod_param_sets=2)
        self.single_stream_modulation = Flux2Modulation(dim, mod_param_sets=1)
        self.x_embedder = nn.Linear(in_channels, dim, bias=False)
        self.context_embedder = nn.Linear(joint_attention_dim, dim, bias=False)
        self.transformer_blocks = nn.ModuleList(
            [
                Flux2TransformerBlock(dim, num_attention_heads, attention_head_dim, mlp_ratio, eps)
                for _ in range(num_layers)
            ]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [
                Flux2SingleTransformerBlock(dim, num_attention_heads, attention_head_dim, mlp_ratio, eps)
                for _ in range(num_single_layers)
            ]
        )
        self.norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=eps, bias=False)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * self.out_channels, bias=False)

    @lora_scale_from("joint_attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        img_ids: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        kv_cache: Flux2KVCache | None = None,
        kv_cache_mode: str | None = None,
        num_ref_tokens: int = 0,
        ref_fixed_timestep: float = 0.0,
    ) -> Flux2Transformer2DModelOutput | tuple[Any, ...]:
        """Predict the flow for packed image tokens (with reference-image tokens appended, for editing).

        Args:
            hidden_states: (B, L_img, in_channels) packed latent tokens; for editing, the reference images'
                tokens follow the noisy image's (or lead them, in an `extract` call).
            encoder_hidden_states: (B, L_txt, joint_attention_dim) text encoder states.
            timestep: (B,) or (1,) sigmas in [0, 1] (scaled by 1000 inside), or a scalar.
            img_ids: (L_img, n_axes) image position ids (or (B, L_img, n_axes) with the same ids in every row);
                txt_ids: the same for the text tokens.
            guidance: (B,) or (1,) embedded guidance scale, required exactly when `guidance_embeds`.
            joint_attention_kwargs: None, or only a LoRA `scale`, which multiplies the adapters' weights for this call.
            return_dict: return a `Flux2Transformer2DModelOutput` instead of a tuple.
            kv_cache_mode: None; "extract" (the first `num_ref_tokens` tokens of `hidden_states` are reference
                tokens, modulated at `ref_fixed_timestep`: their keys and values are returned in a new cache
                and the prediction covers the other tokens); or "cached" (the reference keys and values come
                from `kv_cache`, the cache an extract call returned).

        Returns:
            (B, L, patch_size**2 * out_channels) prediction for the non-reference tokens in an extract call,
            for every token otherwise; an extract call also returns the filled cache (second in the tuple,
            `kv_cache` in the output object).
        """
        batch, text_len = self._check_inputs(hidden_states, encoder_hidden_states, guidance, joint_attention_kwargs)
        num_ref = _check_kv_arguments(
            kv_cache, kv_cache_mode, num_ref_tokens, ref_fixed_timestep, hidden_states.shape[1], self
        )
        num_axes = len(self.config.axes_dims_rope)
        img_ids = _position_ids("img_ids", img_ids, batch, hidden_states.shape[1], num_axes)
        txt_ids = _position_ids("txt_ids", txt_ids, batch, text_len, num_axes)
        dtype = hidden_states.dtype

        timestep = batch_vector("timestep", timestep, batch, hidden_states.device).to(dtype) * 1000
        if guidance is not None:
            guidance = batch_vector("guidance", guidance, batch, hidden_states.device).to(dtype) * 1000
        temb = self.time_guidance_embed(timestep, guidance)  # (B, D)
        mod_img = self.double_stream_modulation_img(temb)  # (B, 6D)
        mod_txt = self.double_stream_modulation_txt(temb)  # (B, 6D)
        mod_single = self.single_stream_modulation(temb)  # (B, 3D)
        new_cache = None
        if kv_cache_mode == "extract":
            # Reference tokens are modulated at their own fixed timestep: one modulation per token.
            ref_temb = self.time_guidance_embed(torch.full_like(timestep, ref_fixed_timestep * 1000), guidance)
            lengths = (num_ref, hidden_states.shape[1] - num_ref)
            mod_img = _per_token((self.double_stream_modulation_img(ref_temb), mod_img), lengths)
            mod_single = _per_token(
                (mod_single, self.single_stream_modulation(ref_temb), mod_single), (text_len, *lengths)
            )
            new_cache = Flux2KVCache(len(self.transformer_blocks), len(self.single_transformer_blocks))
            new_cache.num_ref_tokens = num_ref
        elif kv_cache_mode == "cached":
            num_ref = 0  # the reference tokens are in the cache, not in hidden_states

        hidden_states = self.x_embedder(hidden_states)  # (B, Li, D)
        text = encoder_hidden_states
        # Only the blocks read the projected text and the rotary tables: a skipped step computes neither.
        hidden_states = self.run_blocks(
            hidden_states,
            encoder_hidden_states=Deferred(lambda: self.context_embedder(text), (text,)),  # (B, Lt, D)
            mod_img=mod_img,
            mod_txt=mod_txt,
            mod_single=mod_single,
            rope=Deferred(lambda: self._rope(txt_ids, img_ids), (txt_ids, img_ids)),
            num_ref=num_ref,
            extract_into=new_cache,
            cached_kv=_cached_kv(kv_cache) if kv_cache_mode == "cached" else None,
        )  # (B, Li, D)
        hidden_states = hidden_states[:, num_ref:]  # an extract call predicts no reference token

        output = self.proj_out(self.norm_out(hidden_states, temb))
        if kv_cache_mode == "extract":
            return (output, new_cache) if not return_dict else Flux2Transformer2DModelOutput(output, new_cache)
        return (output,) if not return_dict else Flux2Transformer2DModelOutput(sample=output)

    def _rope(self, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> Rope:
        # Text and image tables are computed apart and joined, as diffusers does (the same values either way).
        text, image = self.pos_embed(txt_ids), self.pos_embed(img_ids)
        return torch.cat([text[0], image[0]], dim=0), torch.cat([text[1], image[1]], dim=0)

    # ---- TeaCache seam ----------------------------------------------------------------------------

    def teacache_indicator(
        self, hidden_states: torch.Tensor, mod_img: torch.Tensor, mod_single: torch.Tensor, **_: Any
    ) -> torch.Tensor:
        """The first block's modulated image tokens (B, Li, D)."""
        if len(self.transformer_blocks):
            (shift, scale, _gate), _ = _split_modulation(mod_img, 2)
            return _modulate(self.transformer_blocks[0].norm1(hidden_states), shift, scale)
        if len(self.single_transformer_blocks):
            ((shift, scale, _gate),) = _split_modulation(mod_single, 1)
            length = hidden_states.shape[1]
            shift, scale = (x if x.shape[1] == 1 else x[:, -length:] for x in (shift, scale))
            return _modulate(self.single_transformer_blocks[0].norm(hidden_states), shift, scale)
        return hidden_states

    def forward_blocks(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        mod_img: torch.Tensor,
        mod_txt: torch.Tensor,
        mod_single: torch.Tensor,
        rope: Rope,
        num_ref: int = 0,
        extract_into: Flux2KVCache | None = None,
        cached_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Dual-stream then single-stream blocks: image (B, Li, D) -> image (B, Li, D)."""
        num_double = len(self.transformer_blocks)
        for index, block in enumerate(self.transformer_blocks):
            layer_cache = None if extract_into is None else extract_into.get_double(index)
            kv = _layer_kv(num_ref, layer_cache, cached_kv, index)
            hidden_states, encoder_hidden_states = self.call_block(
                block, hidden_states, encoder_hidden_states, mod_img, mod_txt, rope, kv
            )
        text_len = encoder_hidden_states.shape[1]
        tokens = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # (B, Lt + Li, D)
        for index, block in enumerate(self.single_transformer_blocks):
            layer_cache = None if extract_into is None else extract_into.get_single(index)
            kv = _layer_kv(num_ref, layer_cache, cached_kv, num_double + index)
            tokens = self.call_block(block, tokens, mod_single, rope, text_len, kv)
        return tokens[:, text_len:]

    # ---- input validation -------------------------------------------------------------------------

    def _check_inputs(
        self,
        hidden_states: Any,
        encoder_hidden_states: Any,
        guidance: Any,
        joint_attention_kwargs: dict[str, Any] | None,
    ) -> tuple[int, int]:
        config = self.config
        check_tokens("hidden_states", hidden_states, None, config.in_channels, min_length=1)
        batch = hidden_states.shape[0]
        check_tokens("encoder_hidden_states", encoder_hidden_states, batch, config.joint_attention_dim)
        check_dtype("hidden_states", hidden_states, self.x_embedder.weight.dtype)
        check_dtype("encoder_hidden_states", encoder_hidden_states, self.context_embedder.weight.dtype)
        check_guidance(guidance, config.guidance_embeds, "FLUX.2 [dev]", "FLUX.2 [klein]")
        check_attention_kwargs("joint_attention_kwargs", joint_attention_kwargs)
        return batch, encoder_hidden_states.shape[1]


def _per_token(mods: tuple[torch.Tensor, ...], lengths: tuple[int, ...]) -> torch.Tensor:
    """Modulations (B, M) for consecutive token spans of `lengths` -> one per token (B, sum(lengths), M)."""
    batch = max(m.shape[0] for m in mods)
    return torch.cat([m.unsqueeze(1).expand(batch, n, -1) for m, n in zip(mods, lengths, strict=True)], dim=1)


def _layer_kv(
    num_ref: int,
    extract_into: Flux2KVLayerCache | None,
    cached_kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
    layer: int,
) -> _LayerKV:
    return _LayerKV(num_ref, extract_into, None if cached_kv is None else cached_kv[layer])


def _cached_kv(cache: Flux2KVCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's (keys, values), double-stream layers first: a list per-sample TeaCache can split by row."""
    return [layer.get() for layer in (*cache.double_block_caches, *cache.single_block_caches)]


def _check_kv_arguments(
    kv_cache: Any,
    mode: Any,
    num_ref_tokens: Any,
    ref_fixed_timestep: Any,
    image_len: int,
    model: Flux2Transformer2DModel,
) -> int:
    """The number of reference tokens leading `hidden_states` (an extract call), else 0."""
    if mode is not None and mode not in KV_CACHE_MODES:
        raise ValueError(f"kv_cache_mode must be None or one of {list(KV_CACHE_MODES)}, got {mode!r}")
    if isinstance(num_ref_tokens, bool) or not isinstance(num_ref_tokens, int) or num_ref_tokens < 0:
        raise ValueError(f"num_ref_tokens must be an integer >= 0, got {num_ref_tokens!r}")
    if isinstance(ref_fixed_timestep, bool) or not isinstance(ref_fixed_timestep, int | float):
        raise TypeError(f"ref_fixed_timestep must be a number, got {type(ref_fixed_timestep).__name__}")
    if mode != "extract" and (num_ref_tokens or ref_fixed_timestep):
        raise ValueError("num_ref_tokens and ref_fixed_timestep are read only with kv_cache_mode='extract'")
    if mode == "extract":
        if kv_cache is not None:
            raise ValueError("an extract call makes a new KV cache: pass kv_cache=None with kv_cache_mode='extract'")
        if not 0 < num_ref_tokens < image_len:
            raise ValueError(
                f"kv_cache_mode='extract' needs 0 < num_ref_tokens < the {image_len} tokens of hidden_states "
                f"(reference tokens first, then the image's), got {num_ref_tokens}"
            )
        return num_ref_tokens
    if mode == "cached":
        if not isinstance(kv_cache, Flux2KVCache):
            raise TypeError(
                f"kv_cache_mode='cached' needs the Flux2KVCache an extract call returned, got {type(kv_cache).__name__}"
            )
        layers = (len(kv_cache.double_block_caches), len(kv_cache.single_block_caches))
        expected = (len(model.transformer_blocks), len(model.single_transformer_blocks))
        if layers != expected:
            raise ValueError(f"kv_cache holds {layers} (double, single) layers, this model has {expected}")
    elif kv_cache is not None:
        raise ValueError("kv_cache is read only with kv_cache_mode='cached'; pass kv_cache_mode or kv_cache=None")
    return 0


def _position_ids(name: str, ids: Any, batch: int, length: int, num_axes: int) -> torch.Tensor:
    """(L, n_axes) ids, or (B, L, n_axes) whose rows are equal (diffusers' pipelines pass them so)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape ({length}, {num_axes}), got {type(ids).__name__}")
    if ids.ndim == 3 and ids.shape[0] in (1, batch):
        if ids.shape[0] > 1 and not (ids == ids[:1]).all():
            raise ValueError(
                f"{name} differs between batch rows; the model takes one set of positions for the whole batch"
            )
        ids = ids[0]
    if ids.shape != (length, num_axes):
        raise ValueError(
            f"{name} must have shape ({length}, {num_axes}) or ({batch}, {length}, {num_axes}), got {tuple(ids.shape)}"
        )
    return ids
