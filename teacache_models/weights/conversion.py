"""Original-release checkpoints: declarative rename tables to the diffusers key layout our models use.

Two families were released in a layout other than diffusers': FLUX.1 as one BFL `.safetensors` file
(`double_blocks.*`, `single_blocks.*`, fused QKV projections, the head's modulation as shift then scale)
and Wan2.1 in the `Wan-AI/Wan2.1-*` repositories (`blocks.*.self_attn.q`, `head.head`, the cross-attention
norm called `norm3`). Each family has one table of `Rename` rules; a key no rule covers is an error, so a
checkpoint is never loaded in part. The tables work on key names and shapes alone, which lets the loader
check a whole checkpoint before reading any tensor, and then convert it one tensor at a time.

The architecture is read off the tensor shapes, since these releases ship no diffusers `config.json`;
what shapes cannot tell (Flux's RoPE split, Wan's head count when no original config is present)
takes the released value and can be overridden by the caller.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .checkpoint import format_keys
from .errors import CheckpointError

__all__ = [
    "FLUX_ORIGINAL",
    "ORIGINAL_FORMATS",
    "WAN_ORIGINAL",
    "KeyMapping",
    "OriginalFormat",
    "Rename",
    "convert_state_dict",
    "detect_original_format",
]

Shapes = Mapping[str, tuple[int, ...]]
_PLACEHOLDER = re.compile(r"\{(\w+)(?::([\w|]+))?\}")
# Where a placeholder has no alternatives: `i` is a block index, `p` a parameter of a linear or norm layer.
_DEFAULT_ALTERNATIVES = {"i": r"\d+", "p": "weight|bias"}
# Prefixes some repackagings (ComfyUI, original training code) put in front of every key.
_STRIPPED_PREFIXES = ("model.diffusion_model.",)


@dataclass(frozen=True)
class Rename:
    """One rule of a rename table.

    Args:
        source: the original key, with placeholders: `{i}` a block index, `{p}` weight or bias,
            `{name:a|b}` one of the listed words; the target refers to them by name.
        targets: the diffusers key, or several when the original tensor is split along dim 0.
        split: the sizes of the parts, "inner" (the model width) or "rest"; equal parts when None.
        swap_halves: exchange the two halves along dim 0 (the original head modulates shift, scale; ours
            scale, shift).
    """

    source: str
    targets: tuple[str, ...]
    split: tuple[str, ...] | None = None
    swap_halves: bool = False
    pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts, position = [], 0
        for match in _PLACEHOLDER.finditer(self.source):
            parts.append(re.escape(self.source[position : match.start()]))
            name, alternatives = match.group(1), match.group(2) or _DEFAULT_ALTERNATIVES.get(match.group(1), r"\w+")
            parts.append(f"(?P<{name}>{alternatives})")
            position = match.end()
        parts.append(re.escape(self.source[position:]))
        object.__setattr__(self, "pattern", re.compile("".join(parts)))
        if self.split is not None and len(self.split) != len(self.targets):
            raise ValueError(f"rename {self.source!r}: split {self.split} does not give one size per target")


def _rename(source: str, *targets: str, split: tuple[str, ...] | None = None, swap_halves: bool = False) -> Rename:
    return Rename(source, targets, split, swap_halves)


@dataclass(frozen=True)
class KeyMapping:
    """Where one key of our model comes from: an original key, a row range of it, a half swap."""

    target: str
    source: str
    rows: tuple[int, int] | None = None
    swap_halves: bool = False

    def shape(self, source_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.rows is None:
            return tuple(source_shape)
        return (self.rows[1] - self.rows[0], *source_shape[1:])

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            # A copy: parameters cut from one fused tensor must not share its storage.
            tensor = tensor[self.rows[0] : self.rows[1]].clone()
        if self.swap_halves:
            first, second = tensor.chunk(2, dim=0)
            tensor = torch.cat([second, first], dim=0)
        return tensor


@dataclass(frozen=True)
class OriginalFormat:
    """An original release's layout: how to recognise it, its rename table and how to read its config.

    Attributes:
        name: for messages.
        model_class: the name of the native class its checkpoints load into.
        marker: a key (prefixes stripped) every checkpoint of this layout has and a diffusers one lacks.
        renames: the rename table; every key of a checkpoint must match exactly one rule.
        infer_config: (shapes, the original config.json or None, the caller's overrides) -> our
            constructor arguments (the overrides are applied on top by the caller; they are passed in
            for what they settle, such as a head count).
    """

    name: str
    model_class: str
    marker: str
    renames: tuple[Rename, ...]
    infer_config: Callable[[Shapes, Mapping[str, Any] | None, Mapping[str, Any]], dict[str, Any]]

    def matches(self, keys: Any) -> bool:
        return any(_strip(key) == self.marker for key in keys)

    def map_keys(self, shapes: Shapes, config: Mapping[str, Any]) -> list[KeyMapping]:
        """The diffusers key of every part of every original tensor; an uncovered key is an error."""
        mappings, uncovered = [], []
        for key, shape in shapes.items():
            rule, match = self._rule(_strip(key))
            if rule is None:
                uncovered.append(key)
                continue
            targets = [target.format(**match.groupdict()) for target in rule.targets]
            if len(targets) == 1:
                mappings.append(KeyMapping(targets[0], key, None, rule.swap_halves))
                continue
            bounds = _split_bounds(key, shape, rule, config)
            mappings.extend(KeyMapping(t, key, b, rule.swap_halves) for t, b in zip(targets, bounds, strict=True))
        if uncovered:
            raise CheckpointError(f"keys that the {self.name} rename table does not cover: {format_keys(uncovered)}")
        return mappings

    def _rule(self, key: str) -> tuple[Rename | None, re.Match | None]:
        for rule in self.renames:
            match = rule.pattern.fullmatch(key)
            if match is not None:
                return rule, match
        return None, None


def _strip(key: str) -> str:
    for prefix in _STRIPPED_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _split_bounds(key: str, shape: tuple[int, ...], rule: Rename, config: Mapping[str, Any]) -> list[tuple[int, int]]:
    rows = shape[0]
    if rule.split is None:
        if rows % len(rule.targets):
            raise CheckpointError(f"{key} has {rows} rows, not divisible into {len(rule.targets)} equal parts")
        sizes = [rows // len(rule.targets)] * len(rule.targets)
    else:
        inner = config["num_attention_heads"] * config["attention_head_dim"]
        fixed = sum(inner for size in rule.split if size == "inner")
        sizes = [inner if size == "inner" else rows - fixed for size in rule.split]
        if min(sizes) < 0 or sum(sizes) != rows:
            raise CheckpointError(f"{key} has {rows} rows, which do not split as {rule.split} with inner={inner}")
    starts = [sum(sizes[:n]) for n in range(len(sizes))]
    return [(start, start + size) for start, size in zip(starts, sizes, strict=True)]


def _count_blocks(shapes: Shapes, prefix: str) -> int:
    indices = {int(m.group(1)) for key in shapes if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", key))}
    if indices != set(range(len(indices))):
        raise CheckpointError(f"the checkpoint's {prefix} are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def _require(shapes: Shapes, format_name: str, *keys: str) -> None:
    missing = [key for key in keys if key not in shapes]
    if missing:
        raise CheckpointError(f"not a complete {format_name} checkpoint: it lacks {format_keys(missing)}")


# ---- FLUX.1 (black-forest-labs single-file release) --------------------------------------------------

_FLUX_RENAMES = (
    _rename("img_in.{p}", "x_embedder.{p}"),
    _rename("txt_in.{p}", "context_embedder.{p}"),
    _rename("time_in.in_layer.{p}", "time_text_embed.timestep_embedder.linear_1.{p}"),
    _rename("time_in.out_layer.{p}", "time_text_embed.timestep_embedder.linear_2.{p}"),
    _rename("vector_in.in_layer.{p}", "time_text_embed.text_embedder.linear_1.{p}"),
    _rename("vector_in.out_layer.{p}", "time_text_embed.text_embedder.linear_2.{p}"),
    _rename("guidance_in.in_layer.{p}", "time_text_embed.guidance_embedder.linear_1.{p}"),
    _rename("guidance_in.out_layer.{p}", "time_text_embed.guidance_embedder.linear_2.{p}"),
    _rename("double_blocks.{i}.img_mod.lin.{p}", "transformer_blocks.{i}.norm1.linear.{p}"),
    _rename("double_blocks.{i}.txt_mod.lin.{p}", "transformer_blocks.{i}.norm1_context.linear.{p}"),
    _rename(
        "double_blocks.{i}.img_attn.qkv.{p}",
        "transformer_blocks.{i}.attn.to_q.{p}",
        "transformer_blocks.{i}.attn.to_k.{p}",
        "transformer_blocks.{i}.attn.to_v.{p}",
    ),
    _rename(
        "double_blocks.{i}.txt_attn.qkv.{p}",
        "transformer_blocks.{i}.attn.add_q_proj.{p}",
        "transformer_blocks.{i}.attn.add_k_proj.{p}",
        "transformer_blocks.{i}.attn.add_v_proj.{p}",
    ),
    _rename("double_blocks.{i}.img_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_q.weight"),
    _rename("double_blocks.{i}.img_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_k.weight"),
    _rename("double_blocks.{i}.txt_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_added_q.weight"),
    _rename("double_blocks.{i}.txt_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_added_k.weight"),
    _rename("double_blocks.{i}.img_attn.proj.{p}", "transformer_blocks.{i}.attn.to_out.0.{p}"),
    _rename("double_blocks.{i}.txt_attn.proj.{p}", "transformer_blocks.{i}.attn.to_add_out.{p}"),
    _rename("double_blocks.{i}.img_mlp.0.{p}", "transformer_blocks.{i}.ff.net.0.proj.{p}"),
    _rename("double_blocks.{i}.img_mlp.2.{p}", "transformer_blocks.{i}.ff.net.2.{p}"),
    _rename("double_blocks.{i}.txt_mlp.0.{p}", "transformer_blocks.{i}.ff_context.net.0.proj.{p}"),
    _rename("double_blocks.{i}.txt_mlp.2.{p}", "transformer_blocks.{i}.ff_context.net.2.{p}"),
    _rename("single_blocks.{i}.modulation.lin.{p}", "single_transformer_blocks.{i}.norm.linear.{p}"),
    # One fused projection: Q, K and V of width `inner`, then the MLP's input projection.
    _rename(
        "single_blocks.{i}.linear1.{p}",
        "single_transformer_blocks.{i}.attn.to_q.{p}",
        "single_transformer_blocks.{i}.attn.to_k.{p}",
        "single_transformer_blocks.{i}.attn.to_v.{p}",
        "single_transformer_blocks.{i}.proj_mlp.{p}",
        split=("inner", "inner", "inner", "rest"),
    ),
    _rename("single_blocks.{i}.norm.query_norm.scale", "single_transformer_blocks.{i}.attn.norm_q.weight"),
    _rename("single_blocks.{i}.norm.key_norm.scale", "single_transformer_blocks.{i}.attn.norm_k.weight"),
    _rename("single_blocks.{i}.linear2.{p}", "single_transformer_blocks.{i}.proj_out.{p}"),
    _rename("final_layer.linear.{p}", "proj_out.{p}"),
    _rename("final_layer.adaLN_modulation.1.{p}", "norm_out.linear.{p}", swap_halves=True),
)


def _flux_config(shapes: Shapes, original: Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
    shapes = {_strip(k): v for k, v in shapes.items()}
    _require(
        shapes, "BFL Flux", "img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "final_layer.linear.weight"
    )
    inner, in_channels = shapes["img_in.weight"]
    norm = next((k for k in shapes if k.endswith("norm.query_norm.scale")), None)
    if norm is None:
        raise CheckpointError("a BFL Flux checkpoint without any block cannot tell its head width")
    head_dim = shapes[norm][0]
    out_channels = shapes["final_layer.linear.weight"][0]
    return dict(
        in_channels=in_channels,
        # The release predicts as many channels as it takes; diffusers writes that as None.
        out_channels=None if out_channels == in_channels else out_channels,
        num_layers=_count_blocks(shapes, "double_blocks"),
        num_single_layers=_count_blocks(shapes, "single_blocks"),
        attention_head_dim=head_dim,
        num_attention_heads=inner // head_dim,
        joint_attention_dim=shapes["txt_in.weight"][1],
        pooled_projection_dim=shapes["vector_in.in_layer.weight"][1],
        guidance_embeds="guidance_in.in_layer.weight" in shapes,
    )


FLUX_ORIGINAL = OriginalFormat(
    name="BFL Flux release",
    model_class="FluxTransformer2DModel",
    marker="img_in.weight",
    renames=_FLUX_RENAMES,
    infer_config=_flux_config,
)


# ---- Wan2.1 (Wan-AI original repositories) ------------------------------------------------------------

_WAN_RENAMES = (
    _rename("patch_embedding.{p}", "patch_embedding.{p}"),
    _rename("text_embedding.0.{p}", "condition_embedder.text_embedder.linear_1.{p}"),
    _rename("text_embedding.2.{p}", "condition_embedder.text_embedder.linear_2.{p}"),
    _rename("time_embedding.0.{p}", "condition_embedder.time_embedder.linear_1.{p}"),
    _rename("time_embedding.2.{p}", "condition_embedder.time_embedder.linear_2.{p}"),
    _rename("time_projection.1.{p}", "condition_embedder.time_proj.{p}"),
    _rename("blocks.{i}.self_attn.{proj:q|k|v}.{p}", "blocks.{i}.attn1.to_{proj}.{p}"),
    _rename("blocks.{i}.self_attn.o.{p}", "blocks.{i}.attn1.to_out.0.{p}"),
    _rename("blocks.{i}.self_attn.norm_{qk:q|k}.weight", "blocks.{i}.attn1.norm_{qk}.weight"),
    _rename("blocks.{i}.cross_attn.{proj:q|k|v}.{p}", "blocks.{i}.attn2.to_{proj}.{p}"),
    _rename("blocks.{i}.cross_attn.o.{p}", "blocks.{i}.attn2.to_out.0.{p}"),
    _rename("blocks.{i}.cross_attn.norm_{qk:q|k}.weight", "blocks.{i}.attn2.norm_{qk}.weight"),
    # Wan2.1 I2V: the CLIP image tokens' own K/V projections in the cross-attention.
    _rename("blocks.{i}.cross_attn.{proj:k|v}_img.{p}", "blocks.{i}.attn2.add_{proj}_proj.{p}"),
    _rename("blocks.{i}.cross_attn.norm_k_img.weight", "blocks.{i}.attn2.norm_added_k.weight"),
    # The original numbers its norms by creation order: norm3 is the cross-attention's, diffusers' norm2.
    _rename("blocks.{i}.norm3.{p}", "blocks.{i}.norm2.{p}"),
    _rename("blocks.{i}.ffn.0.{p}", "blocks.{i}.ffn.net.0.proj.{p}"),
    _rename("blocks.{i}.ffn.2.{p}", "blocks.{i}.ffn.net.2.{p}"),
    _rename("blocks.{i}.modulation", "blocks.{i}.scale_shift_table"),
    _rename("head.head.{p}", "proj_out.{p}"),
    _rename("head.modulation", "scale_shift_table"),
    _rename("img_emb.proj.0.{p}", "condition_embedder.image_embedder.norm1.{p}"),
    _rename("img_emb.proj.1.{p}", "condition_embedder.image_embedder.ff.net.0.proj.{p}"),
    _rename("img_emb.proj.3.{p}", "condition_embedder.image_embedder.ff.net.2.{p}"),
    _rename("img_emb.proj.4.{p}", "condition_embedder.image_embedder.norm2.{p}"),
    _rename("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
)
# Every Wan release uses 128-channel heads; an original config.json's `num_heads` takes precedence.
_WAN_HEAD_DIM = 128


def _wan_config(shapes: Shapes, original: Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
    shapes = {_strip(k): v for k, v in shapes.items()}
    _require(shapes, "Wan2.1", "patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight")
    original = original or {}
    inner, in_channels, *patch_size = shapes["patch_embedding.weight"]
    heads = overrides.get("num_attention_heads", original.get("num_heads"))
    if heads is None:
        if inner % _WAN_HEAD_DIM:
            raise CheckpointError(
                f"the Wan checkpoint is {inner} wide, not a multiple of {_WAN_HEAD_DIM}-channel heads, and has no "
                "config.json with num_heads: pass config={'num_attention_heads': ...}"
            )
        heads = inner // _WAN_HEAD_DIM
    config = dict(
        patch_size=tuple(patch_size),
        num_attention_heads=heads,
        attention_head_dim=inner // heads,
        in_channels=in_channels,
        out_channels=shapes["head.head.weight"][0] // math.prod(patch_size) if "head.head.weight" in shapes else None,
        text_dim=shapes["text_embedding.0.weight"][1],
        freq_dim=shapes["time_embedding.0.weight"][1],
        num_layers=_count_blocks(shapes, "blocks"),
        cross_attn_norm="blocks.0.norm3.weight" in shapes,
        qk_norm="rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in shapes else None,
        eps=original.get("eps", 1e-6),
    )
    if "blocks.0.ffn.0.weight" in shapes:
        config["ffn_dim"] = shapes["blocks.0.ffn.0.weight"][0]
    if "img_emb.proj.0.weight" in shapes:
        config["image_dim"] = shapes["img_emb.proj.0.weight"][0]
    if "blocks.0.cross_attn.k_img.weight" in shapes:
        config["added_kv_proj_dim"] = shapes["blocks.0.cross_attn.k_img.weight"][1]
    if "img_emb.emb_pos" in shapes:
        config["pos_embed_seq_len"] = shapes["img_emb.emb_pos"][1]
    return config


WAN_ORIGINAL = OriginalFormat(
    name="Wan2.1 original release",
    model_class="WanTransformer3DModel",
    marker="head.head.weight",
    renames=_WAN_RENAMES,
    infer_config=_wan_config,
)

ORIGINAL_FORMATS = {f.model_class: f for f in (FLUX_ORIGINAL, WAN_ORIGINAL)}


def detect_original_format(model_class: type, keys: Any) -> OriginalFormat | None:
    """The original layout of `model_class` these keys are in, None when they are not in one."""
    original = ORIGINAL_FORMATS.get(model_class.__name__)
    return original if original is not None and original.matches(keys) else None


def convert_state_dict(
    original: OriginalFormat, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """Convert a whole original-format state dict in memory (the loader does the same tensor by tensor).

    Args:
        original: the layout, e.g. `FLUX_ORIGINAL`.
        state_dict: original keys -> tensors.
        config: our constructor arguments; read off the shapes when None (needed for fused splits).
    """
    shapes = {key: tuple(tensor.shape) for key, tensor in state_dict.items()}
    config = original.infer_config(shapes, None, {}) if config is None else config
    return {m.target: m.apply(state_dict[m.source]) for m in original.map_keys(shapes, config)}
