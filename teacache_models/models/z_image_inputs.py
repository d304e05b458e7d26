"""Z-Image's per-sample inputs: their validation, and their layout as padded token sequences.

Every sample of a Z-Image batch is a list entry of its own size; in the Omni mode a sample is a list of
images with a caption each and, optionally, SigLIP grids. This module checks those lists at the model's
boundary and lays them out as the released model does: per sample, segments (an image, a caption, a SigLIP
grid) padded to a multiple of 32 tokens with their 3-axis RoPE position ids, then one batch per kind of
token, zero-padded to a common length. The released layout's position quirks are kept for parity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from numbers import Integral
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from ..checks import check_tensor

# Every caption and image sequence is padded to a multiple of this many tokens.
SEQ_MULTIPLE = 32
# The released layout gives a missing Omni latent this many zero channels per token.
MISSING_PATCH_WIDTH = 64


def _padding(length: int) -> int:
    return (-length) % SEQ_MULTIPLE


def _grid_ids(size: tuple[int, int, int], start: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """(F, H, W) grid of 3-axis position ids starting at `start` -> (F * H * W, 3) int32, row-major."""
    axes = [torch.arange(s, s + n, dtype=torch.int32, device=device) for s, n in zip(start, size, strict=True)]
    return torch.stack(torch.meshgrid(axes, indexing="ij"), dim=-1).flatten(0, 2)


@dataclasses.dataclass
class Segment:
    """One image, caption or SigLIP grid of a sample, padded to a multiple of 32 tokens before embedding."""

    features: torch.Tensor  # (Ls, C), Ls a multiple of 32
    is_pad: torch.Tensor  # (Ls,) bool: rows replaced by the learned pad token once embedded
    position_ids: torch.Tensor  # (Ls', 3) int32, Ls' >= Ls (see `_caption_segment`)
    noisy: int = 1  # Omni mode: 1 modulates with t, any other value with the clean timestep t = 1


def _padded_segment(features: torch.Tensor, position_ids: torch.Tensor, noisy: int = 1) -> Segment:
    """(L, C) features repeat their last row up to a multiple of 32; the padding takes position (0, 0, 0)."""
    length, extra = len(features), _padding(len(features))
    return Segment(
        features=torch.cat([features, features[-1:].repeat(extra, 1)]),
        is_pad=torch.arange(length + extra, device=features.device) >= length,
        position_ids=torch.cat([position_ids, position_ids.new_zeros((extra, 3))]),
        noisy=noisy,
    )


def _missing_segment(width: int, like: torch.Tensor, noisy: int) -> Segment:
    """An Omni image or SigLIP grid given as None: 32 pad tokens at position (0, 0, 0)."""
    device = like.device
    return Segment(
        features=like.new_zeros((SEQ_MULTIPLE, width)),
        is_pad=torch.ones(SEQ_MULTIPLE, dtype=torch.bool, device=device),
        position_ids=torch.zeros((SEQ_MULTIPLE, 3), dtype=torch.int32, device=device),
        noisy=noisy,
    )


def _caption_segment(caption: torch.Tensor, start: int, noisy: int = 1) -> Segment:
    """A caption's tokens, padding included, take time positions start, start + 1, ...

    The released layout then appends (0, 0, 0) ids for the padding once more, so the ids outnumber the tokens:
    a sample's later Omni captions take their ids shifted by the earlier captions' padding. Kept for parity.
    """
    length = len(caption) + _padding(len(caption))
    return _padded_segment(caption, _grid_ids((length, 1, 1), (start, 0, 0), caption.device), noisy)


def _siglip_segment(features: torch.Tensor, start: int, image_size: tuple[int, int, int] | None, noisy: int) -> Segment:
    """(H, W, C) SigLIP features -> H * W tokens at time `start`, their grid stretched over the image's latent."""
    height, width, channels = features.shape
    # Not a transpose to (H * W, C): the released model reads the channel-first memory in rows of C.
    tokens = features.permute(2, 0, 1).reshape(height * width, channels)
    segment = _padded_segment(tokens, _grid_ids((1, height, width), (start, 0, 0), features.device), noisy)
    if image_size is not None:
        # Truncated float32 arithmetic, as the released model computes these positions.
        ids = segment.position_ids.float()
        ids[:, 1] = ids[:, 1] / max(height - 1, 1) * (image_size[1] - 1)
        ids[:, 2] = ids[:, 2] / max(width - 1, 1) * (image_size[2] - 1)
        segment.position_ids = ids.to(torch.int32)
    return segment


@dataclasses.dataclass
class Layout:
    """A batch before embedding: per sample, its segments of each kind, and the token grid of each image."""

    images: list[list[Segment]]
    captions: list[list[Segment]]
    siglip: list[list[Segment]] | None
    grids: list[list[tuple[int, int, int] | None]]  # None for a missing Omni image


@dataclasses.dataclass
class Sequences:
    """One kind of token (image, caption or SigLIP) of a batch, padded to a common length."""

    tokens: torch.Tensor  # (B, L, D)
    freqs_cis: torch.Tensor  # (B, L, Dh / 2) complex
    mask: torch.Tensor | None  # (B, L) bool, None when every sample has length L
    lengths: list[int]
    noise_mask: torch.Tensor | None = None  # (B, L) int64 in the Omni mode: 1 for noisy tokens, 0 for padding


def pad_batch(
    tokens: list[torch.Tensor], freqs_cis: list[torch.Tensor], noise_masks: list[torch.Tensor] | None = None
) -> Sequences:
    """Per-sample (Li, D) tokens and (Li, Dh / 2) factors -> zero-padded batch with a key mask if lengths differ."""
    lengths = [len(t) for t in tokens]
    longest = max(lengths)
    mask = None
    if any(n != longest for n in lengths):
        mask = torch.zeros((len(lengths), longest), dtype=torch.bool, device=tokens[0].device)
        for row, n in enumerate(lengths):
            mask[row, :n] = True
    return Sequences(
        tokens=pad_sequence(tokens, batch_first=True, padding_value=0.0),
        freqs_cis=pad_sequence(freqs_cis, batch_first=True, padding_value=0.0),
        mask=mask,
        lengths=lengths,
        noise_mask=None if noise_masks is None else pad_sequence(noise_masks, batch_first=True, padding_value=0),
    )


def _joined(parts: list[Sequences], field: str) -> list[torch.Tensor]:
    """Per sample, the unpadded `field` of each part one after another."""
    return [torch.cat([getattr(p, field)[i, : p.lengths[i]] for p in parts]) for i in range(len(parts[0].lengths))]


def unify(parts: list[Sequences]) -> Sequences:
    """Per sample, the unpadded tokens of each part one after another, batched again."""
    noise_masks = None if parts[0].noise_mask is None else _joined(parts, "noise_mask")
    return pad_batch(_joined(parts, "tokens"), _joined(parts, "freqs_cis"), noise_masks)


def stream_noise_mask(parts: list[Sequences]) -> torch.Tensor | None:
    """The (B, L) noise mask of `unify(parts)` (None outside the Omni mode), without joining the tokens."""
    if parts[0].noise_mask is None:
        return None
    return pad_sequence(_joined(parts, "noise_mask"), batch_first=True, padding_value=0)


@dataclasses.dataclass
class Inputs:
    """A forward call's per-sample inputs (the Omni ones None in the text-to-image mode)."""

    x: list[Any]
    t: torch.Tensor  # (B,) or (1,)
    cap_feats: list[Any]
    siglip_feats: list[Any] | None
    image_noise_mask: list[Any] | None

    def rows(self, rows: slice) -> Inputs:
        """The samples `rows` of the batch (a (1,) timestep is shared)."""
        return Inputs(
            x=self.x[rows],
            t=self.t[rows] if self.t.shape[0] == len(self.x) else self.t,
            cap_feats=self.cap_feats[rows],
            siglip_feats=None if self.siglip_feats is None else self.siglip_feats[rows],
            image_noise_mask=None if self.image_noise_mask is None else self.image_noise_mask[rows],
        )


def joint_layout(image_tokens: torch.Tensor, image_lengths: list[int], caption_lengths: list[int]) -> torch.Tensor:
    """(B, Li, D) image tokens -> the (B, L, D) layout of the joint stream, zeros where its captions sit."""
    rows = [
        torch.cat([image_tokens[i, :n], image_tokens.new_zeros((m, image_tokens.shape[-1]))])
        for i, (n, m) in enumerate(zip(image_lengths, caption_lengths, strict=True))
    ]
    return pad_sequence(rows, batch_first=True, padding_value=0.0)


def patchify(image: torch.Tensor, patch_size: int, f_patch_size: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(C, F, H, W) -> tokens (F' * H' * W', pf * p * p * C) and the token grid (F', H', W')."""
    channels, frames, height, width = image.shape
    grid = (frames // f_patch_size, height // patch_size, width // patch_size)
    patches = image.reshape(channels, grid[0], f_patch_size, grid[1], patch_size, grid[2], patch_size)
    # The patch width is explicit: an empty latent (a size 0) still gives (0, pf * p * p * C) tokens.
    tokens = patches.permute(1, 3, 5, 2, 4, 6, 0).reshape(
        grid[0] * grid[1] * grid[2], f_patch_size * patch_size * patch_size * channels
    )
    return tokens, grid


def unpatchify(
    tokens: torch.Tensor, grid: tuple[int, int, int], patch_size: int, f_patch_size: int, channels: int
) -> torch.Tensor:
    """(L, pf * p * p * C) tokens of one sample (padding after the first F' * H' * W') -> (C, F, H, W)."""
    f, h, w = grid
    patches = tokens[: f * h * w].reshape(f, h, w, f_patch_size, patch_size, patch_size, channels)
    return patches.permute(6, 0, 3, 1, 4, 2, 5).reshape(channels, f * f_patch_size, h * patch_size, w * patch_size)


def text_to_image_layout(inputs: Inputs, patch_size: int, f_patch_size: int) -> Layout:
    """Text-to-image: the caption at time positions 1..Lc (padded), then its image from time Lc + 1 on."""
    images, captions, grids = [], [], []
    for image, caption in zip(inputs.x, inputs.cap_feats, strict=True):
        captions.append([_caption_segment(caption, start=1)])
        cap_length = len(captions[-1][0].features)
        tokens, grid = patchify(image, patch_size, f_patch_size)
        images.append([_padded_segment(tokens, _grid_ids(grid, (cap_length + 1, 0, 0), image.device))])
        grids.append([grid])
    return Layout(images, captions, None, grids)


def omni_layout(
    inputs: Inputs, patch_size: int, f_patch_size: int, in_channels: int, siglip_feat_dim: int | None
) -> Layout:
    """Omni: per sample, caption j at the time positions after caption j - 1 (two positions apart), image j
    where its caption ends and SigLIP grid j one later; each segment noisy or clean as its image's flag."""
    target = inputs.x[0][-1]
    # As released, the SigLIP stream runs when the first sample has features (then every sample has them).
    use_siglip = siglip_feat_dim is not None and inputs.siglip_feats[0] is not None
    patch_width = f_patch_size * patch_size * patch_size * in_channels
    images, captions, siglip, grids = [], [], [], []
    for i, (sample_images, sample_captions) in enumerate(zip(inputs.x, inputs.cap_feats, strict=True)):
        flags = inputs.image_noise_mask[i]
        position, ends = 1, []
        captions.append([])
        for j, caption in enumerate(sample_captions):
            captions[-1].append(_caption_segment(caption, position, flags[j] if j < len(flags) else 1))
            position += len(caption)
            ends.append(position)
            position += 2  # one time position for the image, one for its SigLIP grid
        images.append([])
        grids.append([])
        sizes = []
        for j, image in enumerate(sample_images):
            if image is None:
                images[-1].append(_missing_segment(patch_width, target, flags[j]))
                grids[-1].append(None)
                sizes.append(None)
                continue
            tokens, grid = patchify(image, patch_size, f_patch_size)
            ids = _grid_ids(grid, (ends[j], 0, 0), image.device)
            images[-1].append(_padded_segment(tokens, ids, flags[j]))
            grids[-1].append(grid)
            sizes.append(tuple(image.shape[1:]))
        if use_siglip:
            siglip.append(
                [
                    _missing_segment(siglip_feat_dim, target, flags[j])
                    if features is None
                    else _siglip_segment(features, ends[j] + 1, sizes[j], flags[j])
                    for j, features in enumerate(inputs.siglip_feats[i])
                ]
            )
    return Layout(images, captions, siglip if use_siglip else None, grids)


# ---- validation -----------------------------------------------------------------------------------


def check_inputs(
    config: Any,
    dtype: torch.dtype,
    x: Any,
    t: Any,
    cap_feats: Any,
    controlnet_block_samples: Any,
    siglip_feats: Any,
    image_noise_mask: Any,
    patch_size: Any,
    f_patch_size: Any,
) -> None:
    """The forward arguments of a model with `config` and weights in `dtype`: TypeError / ValueError naming the
    argument, the value and what is allowed, before any work."""
    if not isinstance(x, list | tuple) or not x:
        raise TypeError(f"x must be a non-empty list of (C, F, H, W) latent tensors, got {type(x).__name__}")
    pairs = set(zip(config.all_patch_size, config.all_f_patch_size, strict=True))
    if (patch_size, f_patch_size) not in pairs:
        raise ValueError(
            f"(patch_size, f_patch_size) = ({patch_size!r}, {f_patch_size!r}) is not configured; "
            f"choose one of {sorted(pairs)}"
        )
    if not isinstance(cap_feats, list | tuple):
        raise TypeError(
            f"cap_feats must be a list of (L, {config.cap_feat_dim}) tensors, got {type(cap_feats).__name__}"
        )
    if len(cap_feats) != len(x):
        raise ValueError(f"cap_feats must hold one entry per sample of x ({len(x)}), got {len(cap_feats)}")
    patch_width = f_patch_size * patch_size * patch_size * config.in_channels
    if isinstance(x[0], list | tuple):
        images, captions = _check_omni_inputs(config, dtype, x, cap_feats, siglip_feats, image_noise_mask, patch_width)
        # A missing latent (None) still adds 32 pad tokens to its sample.
        has_missing = any(image is None for sample in x for image in sample)
    else:
        images, captions = _check_flat_inputs(x, cap_feats, siglip_feats, image_noise_mask)
        has_missing = False
    device = images[0][1].device
    for name, image in images:
        check_tensor(name, image, (config.in_channels, "F", "H", "W"))
        frames, height, width = image.shape[1:]
        if frames % f_patch_size or height % patch_size or width % patch_size:
            raise ValueError(
                f"{name} has F, H, W = {frames}, {height}, {width}: each must be a multiple of its patch size "
                f"(f_patch_size {f_patch_size}, patch_size {patch_size})"
            )
        if image.device != device:
            raise ValueError(f"{name} is on {image.device}, {images[0][0]} on {device}: all must share one device")
    for name, caption in captions:
        check_tensor(name, caption, ("L", config.cap_feat_dim))
        if caption.device != device:
            raise ValueError(f"{name} is on {caption.device}, x on {device}: use one device")
    for name, image in images:
        if image.dtype != dtype:
            raise TypeError(f"{name} has dtype {image.dtype}, but the model's weights are {dtype}: convert it")
    for name, caption in captions:
        _check_normed_dtype(name, caption, dtype)
    _check_token_counts(config, images, captions, -1 if has_missing else patch_width)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a tensor of shape ({len(x)},) or (1,), got {type(t).__name__}")
    if t.ndim != 1 or t.shape[0] not in (1, len(x)):
        raise ValueError(f"t must have shape ({len(x)},) or (1,), got {tuple(t.shape)}")
    if controlnet_block_samples is not None and not isinstance(controlnet_block_samples, dict):
        raise TypeError(
            "controlnet_block_samples must be None or a dict {layer index: tensor}, "
            f"got {type(controlnet_block_samples).__name__}"
        )


def _check_flat_inputs(
    x: Sequence[Any], cap_feats: Sequence[Any], siglip_feats: Any, image_noise_mask: Any
) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """The text-to-image mode's inputs -> (name, latent) and (name, caption) pairs."""
    omni = "belongs to the Omni mode, where x is a list of lists of latents"
    if siglip_feats is not None:
        raise ValueError(f"siglip_feats must be None with a flat list x: it {omni}")
    if image_noise_mask is not None:
        raise ValueError(f"image_noise_mask must be None with a flat list x: it {omni}")
    if any(isinstance(item, list | tuple) for item in x):
        raise ValueError("x must be a flat list of tensors or (the Omni mode) a list of lists, not a mix")
    return [(f"x[{i}]", image) for i, image in enumerate(x)], [
        (f"cap_feats[{i}]", caption) for i, caption in enumerate(cap_feats)
    ]


def _check_omni_inputs(
    config: Any,
    dtype: torch.dtype,
    x: Sequence[Any],
    cap_feats: Sequence[Any],
    siglip_feats: Any,
    image_noise_mask: Any,
    patch_width: int,
) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """The Omni mode's nested inputs -> (name, latent) and (name, caption) pairs (missing images left out)."""
    batch = len(x)
    for name, value in (("image_noise_mask", image_noise_mask), ("siglip_feats", siglip_feats)):
        if not isinstance(value, list | tuple) or len(value) != batch:
            raise ValueError(
                f"with nested x (the Omni mode), {name} must be a list with an entry per sample ({batch}), "
                f"got {value!r:.80}"
            )
    images, captions = [], []
    for i, (sample, sample_captions, flags) in enumerate(zip(x, cap_feats, image_noise_mask, strict=True)):
        if not isinstance(sample, list | tuple) or not sample:
            raise ValueError(f"x[{i}] must be a non-empty list of latents (nested x: the Omni mode)")
        if i == 0 and sample[-1] is None:
            raise ValueError("x[0][-1], the first sample's target latent, must be a tensor, got None")
        if all(image is None for image in sample):
            raise ValueError(f"x[{i}] holds no latent: at least its last entry must be a tensor")
        if not isinstance(sample_captions, list | tuple) or len(sample_captions) < len(sample):
            raise ValueError(f"cap_feats[{i}] must be a list with a caption per latent of x[{i}] ({len(sample)})")
        if not isinstance(flags, list | tuple) or len(flags) < len(sample):
            raise ValueError(f"image_noise_mask[{i}] must be a list with a flag per latent of x[{i}] ({len(sample)})")
        if not all(isinstance(flag, Integral) for flag in flags):
            raise TypeError(f"image_noise_mask[{i}] must hold integers (1: noisy, 0: clean), got {flags!r}")
        images += [(f"x[{i}][{j}]", image) for j, image in enumerate(sample) if image is not None]
        captions += [(f"cap_feats[{i}][{j}]", caption) for j, caption in enumerate(sample_captions)]
        _check_siglip_sample(config, dtype, i, siglip_feats[i], sample, len(sample_captions), len(flags))
    if any(image is None for sample in x for image in sample) and patch_width != MISSING_PATCH_WIDTH:
        raise ValueError(
            f"a missing latent (None in x) stands for {MISSING_PATCH_WIDTH}-wide zero patches in the released "
            f"layout, so it needs f_patch_size * patch_size ** 2 * in_channels == {MISSING_PATCH_WIDTH}, got "
            f"{patch_width}"
        )
    if config.siglip_feat_dim is not None and siglip_feats[0] is not None:
        missing = [i for i, features in enumerate(siglip_feats) if features is None]
        if missing:
            raise ValueError(
                f"siglip_feats[0] holds features, so every sample needs a list; siglip_feats{missing} are None"
            )
    return images, captions


def _check_siglip_sample(
    config: Any, dtype: torch.dtype, i: int, features: Any, sample: Sequence[Any], captions: int, flags: int
) -> None:
    if features is None:
        return
    if not isinstance(features, list | tuple) or not features:
        raise ValueError(f"siglip_feats[{i}] must be None or a non-empty list with an entry per latent of x[{i}]")
    if len(features) > min(captions, flags):
        raise ValueError(
            f"siglip_feats[{i}] has {len(features)} entries, more than cap_feats[{i}] ({captions}) or "
            f"image_noise_mask[{i}] ({flags})"
        )
    width = config.siglip_feat_dim
    uses_siglip = width is not None
    for j, grid in enumerate(features):
        name = f"siglip_feats[{i}][{j}]"
        if grid is None:
            if not uses_siglip:
                raise ValueError(f"{name} is None, but this model has no SigLIP stream (siglip_feat_dim is None)")
            continue
        if j >= len(sample):
            raise ValueError(f"{name} has no latent x[{i}][{j}] to be placed with")
        check_tensor(name, grid, ("H", "W", width if uses_siglip else "C"))
        if uses_siglip:
            _check_normed_dtype(name, grid, dtype)
        if not grid.shape[0] or not grid.shape[1]:
            raise ValueError(f"{name} must hold at least one feature, got shape {tuple(grid.shape)}")


def _check_token_counts(
    config: Any, images: list[tuple[str, torch.Tensor]], captions: list[tuple[str, torch.Tensor]], patch_width: int
) -> None:
    """A sample may have an empty latent or caption, but no block stack may run over an empty batch."""
    has_image = any(image.numel() for _, image in images) or patch_width < 0
    has_caption = any(len(caption) for _, caption in captions)
    stacks = (
        (config.n_refiner_layers and not has_image, "x", "every latent is empty (F, H or W is 0)"),
        (config.n_refiner_layers and not has_caption, "cap_feats", "every caption has 0 tokens"),
        (config.n_layers and not (has_image or has_caption), "x", "every latent and caption is empty"),
    )
    for empty, name, what in stacks:
        if empty:
            raise ValueError(f"{name}: {what}, so the blocks would attend over no token; give one sample some")


def _check_normed_dtype(name: str, features: torch.Tensor, dtype: torch.dtype) -> None:
    """Features entering an RMSNorm + Linear embedder of weights in `dtype`: the norm casts them to half-precision
    weights, and otherwise leaves them promoted with its float32 statistics, which the Linear must accept."""
    normed = dtype
    if dtype not in (torch.float16, torch.bfloat16):
        normed = torch.promote_types(torch.promote_types(features.dtype, torch.float32), dtype)
    if normed != dtype:
        raise TypeError(f"{name} has dtype {features.dtype}, but the model's weights are {dtype}: convert it")
